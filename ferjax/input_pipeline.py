"""Batches: resumable shuffled training batches and exact, fixed-shape eval batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class TrainBatches:
  """Shuffled training batches whose order is a pure function of (seed, step).

  Every epoch is a fresh permutation drawn from ``(seed, epoch)``, and the last
  partial batch of an epoch is dropped so every batch has the same shape.
  Because batch ``k`` depends on nothing but the seed and ``k``, a resumed run
  sees exactly the batches an uninterrupted run would have seen.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
               soft_labels: np.ndarray | None = None):
    if batch_size > len(labels):
      raise ValueError(f"batch size {batch_size} is larger than the {len(labels)} "
                       "training examples")
    self.images = images
    self.labels = labels
    self.soft_labels = soft_labels
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = len(labels) // batch_size
    self._epoch = -1
    self._order = None

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation of example indices used in ``epoch``."""
    if epoch != self._epoch:
      self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.labels))
      self._epoch = epoch
    return self._order

  def indices(self, step: int) -> np.ndarray:
    """Example indices of global step ``step`` (0-based)."""
    epoch, k = divmod(step, self.steps_per_epoch)
    return self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of global step ``step``: ``image`` uint8, ``label`` int32."""
    idx = np.sort(self.indices(step))  # Sorted gathers read memory in order.
    out = {"image": self.images[idx], "label": self.labels[idx]}
    if self.soft_labels is not None:
      out["soft_label"] = self.soft_labels[idx]
    return out


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once in fixed-shape batches.

  The last batch is padded to ``batch_size`` and ``mask`` marks the real
  examples, so one compiled eval step serves all batches and metrics summed
  over ``mask`` are exact.

  Args:
    images: uint8 ``(N, 48, 48, 1)``.
    labels: int ``(N,)``.
    batch_size: examples per batch.

  Yields:
    dicts with ``image`` ``(B, 48, 48, 1)``, ``label`` ``(B,)``, ``mask`` ``(B,)`` bool.
  """
  n = len(labels)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch = {
        "image": images[start:stop],
        "label": np.asarray(labels[start:stop], np.int32),
        "mask": np.ones(stop - start, bool),
    }
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch
