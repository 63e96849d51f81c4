"""Random augmentation of face batches as a jittable JAX function.

All randomness comes from the key, so a batch's augmentation is reproducible
and runs on the device inside the jitted train step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """What :func:`augment` does; the defaults suit 48x48 FER2013 faces.

  Attributes:
    max_shift: largest translation in pixels, along each axis.
    flip: mirror half of the faces horizontally.
    max_rotation: largest rotation in degrees, either way.
    max_scale: scale drawn from ``[1 - max_scale, 1 + max_scale]``.
    erase_prob: probability of random erasing (a rectangle set to the mean).
    erase_area: range of the erased fraction of the image.
    erase_aspect: range of the erased rectangle's aspect ratio (log-uniform).
  """

  max_shift: float = 4.0
  flip: bool = True
  max_rotation: float = 10.0
  max_scale: float = 0.1
  erase_prob: float = 0.0
  erase_area: tuple[float, float] = (0.02, 0.2)
  erase_aspect: tuple[float, float] = (0.3, 3.3)

  @property
  def warps(self) -> bool:
    return bool(self.max_shift or self.flip or self.max_rotation or self.max_scale)


NO_AUGMENT = AugmentConfig(max_shift=0.0, flip=False, max_rotation=0.0, max_scale=0.0)


def augment(key: jax.Array, x_BxHxWxC: jax.Array, config: AugmentConfig) -> jax.Array:
  """Randomly shifts, flips, rotates, scales and erases each image.

  Args:
    key: PRNG key; the same key gives the same result.
    x_BxHxWxC: float images (already through ``preprocess``).
    config: what to apply.

  Returns:
    The augmented batch, same shape and dtype.
  """
  warp_key, erase_key = jax.random.split(key)
  if config.warps:
    x_BxHxWxC = _random_affine(warp_key, x_BxHxWxC, config)
  if config.erase_prob > 0:
    x_BxHxWxC = _random_erase(erase_key, x_BxHxWxC, config)
  return x_BxHxWxC


def _random_affine(key, x_BxHxWxC, config: AugmentConfig):
  b = x_BxHxWxC.shape[0]
  k_shift, k_flip, k_rot, k_scale = jax.random.split(key, 4)
  shift_Bx2 = jax.random.uniform(k_shift, (b, 2), minval=-config.max_shift, maxval=config.max_shift)
  flip_B = (jax.random.bernoulli(k_flip, 0.5, (b,)) if config.flip
            else jnp.zeros((b,), bool))
  angle_B = jax.random.uniform(k_rot, (b,), minval=-1.0, maxval=1.0) * math.radians(config.max_rotation)
  scale_B = 1.0 + jax.random.uniform(k_scale, (b,), minval=-1.0, maxval=1.0) * config.max_scale
  return affine_warp(x_BxHxWxC, angle_B, scale_B, shift_Bx2, flip_B)


def affine_warp(x_BxHxWxC, angle_B, scale_B, shift_Bx2, flip_B):
  """Rotates, scales, shifts and mirrors each image about its centre.

  Bilinear sampling with edge replication. ``shift_Bx2`` is (dy, dx) in pixels.
  """
  _, h, w, _ = x_BxHxWxC.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  # Map each output pixel back to where it samples the input (inverse warp).
  v = ys[None] - cy - shift_Bx2[:, 0, None, None]
  u = xs[None] - cx - shift_Bx2[:, 1, None, None]
  cos, sin = jnp.cos(angle_B)[:, None, None], jnp.sin(angle_B)[:, None, None]
  inv_scale = 1.0 / scale_B[:, None, None]
  src_u = (cos * u + sin * v) * inv_scale
  src_v = (-sin * u + cos * v) * inv_scale
  src_u = jnp.where(flip_B[:, None, None], -src_u, src_u)
  return bilinear_sample(x_BxHxWxC, src_v + cy, src_u + cx)


def bilinear_sample(x_BxHxWxC, y_BxHxW, x_BxHxW):
  """Samples each image at fractional (y, x) positions, clamping at the edges."""
  b, h, w, c = x_BxHxWxC.shape
  y = jnp.clip(y_BxHxW, 0.0, h - 1.0)
  x = jnp.clip(x_BxHxW, 0.0, w - 1.0)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
  flat_BxNxC = x_BxHxWxC.reshape(b, h * w, c)

  def gather(yi, xi):
    idx = (yi * w + xi).reshape(b, -1, 1)
    return jnp.take_along_axis(flat_BxNxC, idx, axis=1).reshape(b, h, w, c)

  top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
  bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
  return top * (1 - wy) + bottom * wy


def _random_erase(key, x_BxHxWxC, config: AugmentConfig):
  b, h, w, _ = x_BxHxWxC.shape
  k_apply, k_area, k_aspect, k_y, k_x = jax.random.split(key, 5)
  apply_B = jax.random.bernoulli(k_apply, config.erase_prob, (b,))
  area_B = jax.random.uniform(k_area, (b,), minval=config.erase_area[0],
                              maxval=config.erase_area[1]) * h * w
  log_lo, log_hi = math.log(config.erase_aspect[0]), math.log(config.erase_aspect[1])
  aspect_B = jnp.exp(jax.random.uniform(k_aspect, (b,), minval=log_lo, maxval=log_hi))
  eh_B = jnp.clip(jnp.sqrt(area_B * aspect_B), 1.0, h)
  ew_B = jnp.clip(jnp.sqrt(area_B / aspect_B), 1.0, w)
  y0_B = jax.random.uniform(k_y, (b,)) * (h - eh_B)
  x0_B = jax.random.uniform(k_x, (b,)) * (w - ew_B)
  ys = jnp.arange(h, dtype=jnp.float32)[None, :, None]
  xs = jnp.arange(w, dtype=jnp.float32)[None, None, :]
  inside_BxHxW = ((ys >= y0_B[:, None, None]) & (ys < (y0_B + eh_B)[:, None, None])
                  & (xs >= x0_B[:, None, None]) & (xs < (x0_B + ew_B)[:, None, None]))
  erase_BxHxW = inside_BxHxW & apply_B[:, None, None]
  # Zero is the data set mean after preprocess.
  return jnp.where(erase_BxHxW[..., None], 0.0, x_BxHxWxC)
