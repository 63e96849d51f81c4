"""Random augmentation of face batches as a jittable JAX function.

All randomness comes from the key, so a batch's augmentation is reproducible
and runs on the device inside the jitted train step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ferjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """What :func:`augment` does; the defaults suit 48x48 FER2013 faces.

  Attributes:
    max_shift: largest translation in pixels, along each axis.
    flip: mirror half of the faces horizontally.
    max_rotation: largest rotation in degrees, either way.
    max_scale: scale drawn from ``[1 - max_scale, 1 + max_scale]``; below 1.
    erase_prob: probability of random erasing (a rectangle set to the mean).
    erase_area: range of the erased fraction of the image.
    erase_aspect: range of the erased rectangle's aspect ratio (log-uniform).
    mixup_alpha: mixup (Zhang et al. 2018) with a mixing weight drawn from
      Beta(alpha, alpha): a face is blended with another face of the batch,
      and its target with that face's target in the same proportion. 0 is off.
    cutmix_alpha: CutMix (Yun et al. 2019) with Beta(alpha, alpha): a
      rectangle of the face is replaced by the same rectangle of another face
      and the targets mix in proportion to the areas. 0 is off. With both
      alphas set, each mixed face gets one of the two at random.
    mix_prob: probability that a face is mixed at all (when an alpha is set).
  """

  max_shift: float = 4.0
  flip: bool = True
  max_rotation: float = 10.0
  max_scale: float = 0.1
  erase_prob: float = 0.0
  erase_area: tuple[float, float] = (0.02, 0.2)
  erase_aspect: tuple[float, float] = (0.3, 3.3)
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0

  def __post_init__(self):
    if not isinstance(self.flip, bool):
      raise ConfigError(f"augment option flip={self.flip!r}: must be true or false")
    for name, top in (("erase_area", 1.0), ("erase_aspect", None)):
      value = getattr(self, name)
      pair = tuple(value) if isinstance(value, (tuple, list)) else None
      if (pair is None or len(pair) != 2
          or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair)
          or not 0 < pair[0] <= pair[1] or (top is not None and pair[1] > top)):
        bound = f" <= {top:g}" if top is not None else ""
        raise ConfigError(f"augment option {name}={value!r}: must be a range (low, high) with "
                          f"0 < low <= high{bound}")
      object.__setattr__(self, name, tuple(float(v) for v in pair))  # A list from JSON, too.
    for name in ("max_shift", "max_rotation", "max_scale", "erase_prob", "mixup_alpha",
                 "cutmix_alpha", "mix_prob"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"augment option {name}={value!r}: must be a number")
    for name in ("erase_prob", "mix_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ConfigError(f"augment option {name}={getattr(self, name)}: must be in [0, 1]")
    if not self.max_scale < 1:  # The scale is drawn from 1 ± max_scale; 0 or less breaks the warp.
      raise ConfigError(f"augment option max_scale={self.max_scale}: must be below 1")
    for name in ("max_shift", "max_rotation", "max_scale", "mixup_alpha", "cutmix_alpha"):
      if getattr(self, name) < 0:
        raise ConfigError(f"augment option {name}={getattr(self, name)}: must not be negative")

  @property
  def mixes(self) -> bool:
    """Whether :func:`mix_batch` changes anything (the train step calls it: it needs the targets)."""
    return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  @property
  def warps(self) -> bool:
    """Whether :func:`augment` shifts, flips, rotates or scales (else it skips the warp)."""
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


def mix_partners(key: jax.Array, b: int) -> jax.Array:
  """Each of ``b`` faces' partner index: one random cycle through all ``b`` (none its own)."""
  order_B = jax.random.permutation(key, b)
  return jnp.zeros((b,), jnp.int32).at[order_B].set(jnp.roll(order_B, -1).astype(jnp.int32))


def mix_batch(key: jax.Array, x_BxHxWxC: jax.Array, targets_BxC: jax.Array, weights_B: jax.Array,
              config: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup and CutMix: mixes each face with a random partner from the same batch.

  The partners, :func:`mix_partners` of a key of their own, follow one random
  cycle through the batch: no face is its own partner, and the pairing does
  not depend on the batch's order (which need not be random: the input
  pipeline sorts each batch's indices, and an image folder stores its faces
  class by class). Each face ``i`` keeps a share ``lam_i`` of itself: its
  image is ``lam_i * x_i + (1 - lam_i) * x_p(i)`` (mixup) or ``x_i`` with a
  rectangle of ``x_p(i)`` pasted in, covering ``1 - lam_i`` of the image
  (CutMix); its target and its loss weight mix with the same shares. Faces
  not drawn (``mix_prob``) come back unchanged.

  Args:
    key: PRNG key; the same key gives the same result.
    x_BxHxWxC: float images, after :func:`augment`.
    targets_BxC: target distributions (one-hot, smoothed later by the loss).
    weights_B: each face's loss weight (its class weight).
    config: the alphas and ``mix_prob``.

  Returns:
    ``(images, targets, weights)``, same shapes and dtypes.
  """
  b, h, w, _ = x_BxHxWxC.shape
  # The partners' key is not reused for anything else (fold_in(key, 1) would be split(key)[1]).
  k_apply, k_partner, k_mix, k_cut, k_y, k_x, k_kind = jax.random.split(key, 7)
  partner_B = mix_partners(k_partner, b)
  partner_x = x_BxHxWxC[partner_B]
  apply_B = jax.random.bernoulli(k_apply, config.mix_prob, (b,))
  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    cut_B = apply_B & jax.random.bernoulli(k_kind, 0.5, (b,))
  else:
    cut_B = apply_B & (config.cutmix_alpha > 0)
  lam_B = jnp.ones((b,), jnp.float32)
  mixed = x_BxHxWxC
  if config.mixup_alpha > 0:
    a = config.mixup_alpha
    lam_B = jnp.where(apply_B & ~cut_B, jax.random.beta(k_mix, a, a, (b,)), lam_B)
    blend_B = lam_B[:, None, None, None]
    mixed = blend_B * x_BxHxWxC + (1.0 - blend_B) * partner_x
  if config.cutmix_alpha > 0:
    # The rectangle: (1 - lam) of the area around a uniform centre, clipped to the
    # image; lam is then recomputed from the pixels actually pasted.
    a = config.cutmix_alpha
    side_B = jnp.sqrt(1.0 - jax.random.beta(k_cut, a, a, (b,)))
    cy_B = jax.random.uniform(k_y, (b,)) * h
    cx_B = jax.random.uniform(k_x, (b,)) * w
    y0_B = jnp.clip(jnp.round(cy_B - 0.5 * h * side_B), 0, h)
    y1_B = jnp.clip(jnp.round(cy_B + 0.5 * h * side_B), 0, h)
    x0_B = jnp.clip(jnp.round(cx_B - 0.5 * w * side_B), 0, w)
    x1_B = jnp.clip(jnp.round(cx_B + 0.5 * w * side_B), 0, w)
    ys = jnp.arange(h, dtype=jnp.float32)[None, :, None]
    xs = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    paste_BxHxW = ((ys >= y0_B[:, None, None]) & (ys < y1_B[:, None, None])
                   & (xs >= x0_B[:, None, None]) & (xs < x1_B[:, None, None])
                   & cut_B[:, None, None])
    lam_B = jnp.where(cut_B, 1.0 - paste_BxHxW.mean(axis=(1, 2)), lam_B)
    mixed = jnp.where(paste_BxHxW[..., None], partner_x, mixed)
  targets = lam_B[:, None] * targets_BxC + (1.0 - lam_B[:, None]) * targets_BxC[partner_B]
  weights = lam_B * weights_B + (1.0 - lam_B) * weights_B[partner_B]
  return mixed.astype(x_BxHxWxC.dtype), targets.astype(targets_BxC.dtype), weights
