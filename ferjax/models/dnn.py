"""The classic CNN ("DNN") the seed project compared against.

conv5x5x64 → max-pool 3x3/2 → LRN → conv3x3x64 → LRN → max-pool 3x3/2 →
fc384 → fc192 (linear) → fc C. The seed's code fed conv2 from the pool output
before its LRN, so the first LRN did nothing; here it sits where it was meant.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from ferjax.models.layers import LocalResponseNorm, check_model_input, he_normal, max_pool_same


class DNN(nnx.Module):
  """The seed's baseline CNN with TensorFlow-style local response normalisation."""

  def __init__(self, num_classes: int = 7, *, rngs: nnx.Rngs, width: int = 64,
               fc_sizes: tuple[int, int] = (384, 192), dropout: float = 0.5,
               image_size: int = 48):
    self.conv1 = nnx.Conv(1, width, (5, 5), padding="SAME", kernel_init=he_normal, rngs=rngs)
    self.norm1 = LocalResponseNorm()
    self.conv2 = nnx.Conv(width, width, (3, 3), padding="SAME", kernel_init=he_normal, rngs=rngs)
    self.norm2 = LocalResponseNorm()
    pooled = math.ceil(math.ceil(image_size / 2) / 2)  # Two SAME pools with stride 2.
    self.fc1 = nnx.Linear(pooled * pooled * width, fc_sizes[0], kernel_init=he_normal, rngs=rngs)
    self.fc2 = nnx.Linear(fc_sizes[0], fc_sizes[1], rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = nnx.Linear(fc_sizes[1], num_classes, rngs=rngs)
    self.image_size = image_size  # fc1's size depends on it: other input sizes cannot run.

  def forward(self, x_BxHxWx1: jax.Array) -> tuple[jax.Array, dict]:
    """Returns logits ``(B, C)`` and an empty dict (no attention in this model).

    Raises:
      ValueError: input that is not float ``(B, image_size, image_size, 1)``
        (e.g. uint8 faces not passed through :func:`ferjax.preprocess.preprocess`).
    """
    check_model_input(x_BxHxWx1, size=self.image_size)
    x = jax.nn.relu(self.conv1(x_BxHxWx1))
    x = self.norm1(max_pool_same(x))
    x = jax.nn.relu(self.conv2(x))
    x = max_pool_same(self.norm2(x))
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # Not -1: an empty batch has size 0.
    x = self.dropout(jax.nn.relu(self.fc1(x)))
    x = self.fc2(x)  # Linear, as in the original.
    return self.classifier(x), {}

  def __call__(self, x_BxHxWx1: jax.Array) -> jax.Array:
    return self.forward(x_BxHxWx1)[0]
