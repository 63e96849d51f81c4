"""Figures: training curves, confusion matrices, face grids and attention maps, as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # Files only; never needs a display.
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  os.replace(tmp, path)  # Never leave a half-written figure behind.


def plot_training_curves(records: Sequence[dict], path: str) -> None:
  """Loss and accuracy per evaluation (train and eval split) against epoch."""
  plt = _pyplot()
  epochs = [r["epoch"] for r in records]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  # The training loss is the optimised one (label smoothing, class weights, soft
  # targets); the evaluation loss is the plain NLL of the true labels.
  ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train (training objective)")
  ax_loss.plot(epochs, [r["eval_loss"] for r in records],
               label=f"{records[-1]['eval_split']} (NLL)")
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("loss")
  ax_loss.legend()
  ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in records], label="train")
  ax_acc.plot(epochs, [100 * r["eval_accuracy"] for r in records],
              label=records[-1]["eval_split"])
  ax_acc.set_xlabel("epoch")
  ax_acc.set_ylabel("accuracy (%)")
  ax_acc.legend()
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  _save(fig, path)
  plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str,
                   title: str = "") -> None:
  """Row-normalised confusion matrix with counts."""
  plt = _pyplot()
  cm = np.asarray(confusion, np.float64)
  norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(6.4, 5.6))
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(len(class_names)):
    for j in range(len(class_names)):
      ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7,
              color="white" if norm[i, j] > 0.5 else "black")
  if title:
    ax.set_title(title)
  _save(fig, path)
  plt.close(fig)


def plot_attention_grid(faces: np.ndarray, alpha: np.ndarray, titles: Sequence[str],
                        path: str, columns: int = 8) -> None:
  """Local attention over the trunk's positions as a heat map on each face.

  Args:
    faces: uint8 ``(N, 48, 48, 1)``.
    alpha: ``(N, h*w)`` attention weights (row-major positions).
    titles: one caption per face.
    path: the PNG to write.
    columns: faces per row.
  """
  plot_face_grid(faces, titles, path, columns, alpha=alpha)


def plot_face_grid(faces: np.ndarray, titles: Sequence[str], path: str, columns: int = 8, *,
                   alpha: np.ndarray | None = None) -> None:
  """Faces in a grid, one caption each; with ``alpha``, its heat map on each face.

  Args:
    faces: uint8 ``(N, 48, 48, 1)``.
    titles: one caption per face.
    path: the PNG to write.
    columns: faces per row.
    alpha: optional ``(N, h*w)`` weights over a square grid of positions (row-major).
  """
  plt = _pyplot()
  n = len(faces)
  rows = max(-(-n // columns), 1)
  fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.85 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(n):
    ax = axes.ravel()[i]
    ax.imshow(faces[i, ..., 0], cmap="gray", vmin=0, vmax=255)
    if alpha is not None:
      side = int(round(np.sqrt(alpha.shape[1])))
      ax.imshow(alpha[i].reshape(side, side), cmap="jet", alpha=0.45,
                extent=(-0.5, faces.shape[2] - 0.5, faces.shape[1] - 0.5, -0.5),
                interpolation="bilinear")
    ax.set_title(titles[i], fontsize=7)
  _save(fig, path)
  plt.close(fig)
