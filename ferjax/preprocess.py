"""The one face → model-input transform, shared by training, evaluation and inference."""

from __future__ import annotations

import jax.numpy as jnp

# Mean and standard deviation of FER2013 Training pixels scaled to [0, 1]
# (28,709 images; measured with ferjax.data, see BUILD_NOTES.md).
PIXEL_MEAN = 0.5077
PIXEL_STD = 0.2550


def preprocess(images):
  """Turns uint8 faces into standardised float32 model input.

  Args:
    images: uint8 ``(..., 48, 48, 1)`` grey faces (numpy or jax).

  Returns:
    float32 array of the same shape, ``(x / 255 - mean) / std``.

  Raises:
    ValueError: images that are not uint8; floats (already scaled to [0, 1]
      or standardised) would be scaled again, to wrong model input.
  """
  x = jnp.asarray(images)
  if x.dtype != jnp.uint8:
    got = getattr(images, "dtype", x.dtype)  # int64 as given, not JAX's int32.
    raise ValueError(f"preprocess takes uint8 faces (0..255), got {got}; it does the "
                     "scaling and standardising itself, so pass the faces as loaded "
                     "(ferjax.data.FerData.images)")
  x = x.astype(jnp.float32) * (1.0 / 255.0)
  return (x - PIXEL_MEAN) * (1.0 / PIXEL_STD)
