"""Distillation: the teachers a run learns from, and the soft targets they give it.

A teacher is a finished run (its best checkpoint) or a ``TEACHER_FILE`` of
saved predictions. A distilled run keeps its teachers' averaged predictions in
its workdir, so that a resume trains on the targets it started with.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from ferjax import checkpoint as checkpoint_lib
from ferjax import data as data_lib
from ferjax import evaluate as evaluate_lib
from ferjax import parallel
from ferjax import splits
from ferjax.config import TrainConfig
from ferjax.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher_predictions.npz"


def distill_sources(config: TrainConfig) -> list[str]:
  """The teachers named by ``config.distill_from`` (comma-separated)."""
  if not config.distill_from:
    return []
  return [p.strip() for p in config.distill_from.split(",") if p.strip()]


def load_teachers(config: TrainConfig, class_names, workdir: str,
                  train: data_lib.FerData | None = None) -> list:
  """The teachers, checked before anything is written: (source, model, meta) each.

  A source is a trained run's workdir (its best checkpoint), or a
  ``TEACHER_FILE`` that another distilled run saved: the teachers' averaged
  predictions, with no model (None) and the probabilities in ``meta["probs"]``.
  """
  sources = distill_sources(config)
  teachers = []
  for source in sources:
    if os.path.isfile(source):
      if len(sources) > 1:
        raise ConfigError(f"--distill_from={source} is a file of saved predictions, already an "
                          "average over its teachers: name it alone")
      probs = _saved_teacher_probs(source, class_names, train)
      teachers.append((source, None, {"model": "saved predictions", "step": 0, "probs": probs}))
      continue
    if source.endswith(".npz") and not os.path.exists(source):
      raise CheckpointError(f"--distill_from: {os.path.abspath(source)}: no such file")
    teacher, meta = checkpoint_lib.load_other_run(
        source, workdir, "--distill_from", "a teacher must be another, finished run")
    if list(meta["class_names"]) != list(class_names):
      raise ConfigError(f"--distill_from={source}: the teacher predicts "
                        f"{meta['class_names']}, this run has {list(class_names)}")
    teachers.append((source, teacher, meta))
  return teachers


def _saved_teacher_probs(path: str, class_names, train: data_lib.FerData | None) -> np.ndarray:
  """The probabilities in a ``TEACHER_FILE`` named by --distill_from, checked against ``train``."""
  try:
    saved = _load_saved_predictions(path)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(f"--distill_from: not a file of saved teacher predictions ({TEACHER_FILE}, "
                    f"written by a distilled run): {e}", path=path) from None
  probs = saved["probs"]
  if "class_names" in saved and saved["class_names"].tolist() != list(class_names):
    raise ConfigError(f"--distill_from={path}: the predictions are over "
                      f"{saved['class_names'].tolist()}, this run has {list(class_names)}")
  if train is not None:
    if probs.shape != (len(train), len(class_names)):
      raise ConfigError(f"--distill_from={path}: the predictions have shape {probs.shape}, this "
                        f"run's training split needs ({len(train)}, {len(class_names)})")
    if str(saved["fingerprint"]) != splits.fingerprint(train):
      raise ConfigError(f"--distill_from={path}: the predictions were made for other training "
                        "images or labels than this run's (their digests differ)")
  if not (np.all(np.isfinite(probs)) and np.all(probs >= 0)
          and np.allclose(probs.sum(axis=-1), 1, atol=1e-3)):
    raise DataError("--distill_from: the saved predictions are not probabilities", path=path)
  log.info("distilling from the predictions saved in %s (teachers: %s)", path,
           ", ".join(saved["sources"].tolist()))
  return probs.astype(np.float32)


def training_targets(config: TrainConfig, train: data_lib.FerData, class_names,
                     teachers: list, workdir: str | None = None) -> np.ndarray | None:
  """Soft targets for the training examples, or None to train on the labels.

  FER+ vote distributions with ``soft_targets``; with ``distill_from``, the
  teachers' probabilities (each averaged over the face and its mirror image,
  then averaged over the teachers, equally weighted) mixed with the one-hot
  labels: ``(1 - w) * onehot + w * teacher``. With a ``workdir``, the
  teachers' averaged predictions are kept there (``TEACHER_FILE``), and a
  resumed run reuses them: its targets stay those it started with, and it
  skips predicting the training set again.
  """
  if config.soft_targets:
    targets = train.soft_labels
  else:
    targets = np.eye(len(class_names), dtype=np.float32)[train.labels]
  if not teachers:
    return targets if config.soft_targets else None
  probs = _teacher_predictions(teachers, train, class_names, config.eval_batch_size, workdir)
  w = config.distill_weight
  return ((1 - w) * targets + w * probs).astype(np.float32)


def _teacher_predictions(teachers: list, train: data_lib.FerData, class_names: Sequence[str],
                         batch_size: int, workdir: str | None) -> np.ndarray:
  """The teachers' averaged probabilities on ``train``, saved in (or read from) ``workdir``."""
  class_names, num_classes = list(class_names), len(class_names)
  sources = [source for source, _, _ in teachers]
  steps = [int(meta["step"]) for _, _, meta in teachers]
  path = os.path.join(workdir, TEACHER_FILE) if workdir else None
  fingerprint = splits.fingerprint(train) if path else ""
  saved = _read_saved_predictions(path) if path and os.path.exists(path) else None
  if saved is not None:
    if (saved["sources"].tolist() == sources and str(saved["fingerprint"]) == fingerprint
        and saved["probs"].shape == (len(train), num_classes)):
      changed = [f"{s} (step {old} then, {new} now)"
                 for s, old, new in zip(sources, saved["steps"].tolist(), steps) if old != new]
      if changed:
        log.warning("the best checkpoint of %s changed since this run started; it goes on "
                    "with the predictions it started with", ", ".join(changed))
      log.info("distilling: reusing the teachers' predictions in %s", path)
      return saved["probs"]
    log.warning("%s does not match these teachers or this training data; predicting again",
                path)
  probs = np.zeros((len(train), num_classes), np.float64)
  for source, teacher, meta in teachers:
    if teacher is None:  # A file of saved predictions (load_teachers checked it).
      probs += meta["probs"]
      continue
    log.info("distilling from %s (%s, step %d): predicting %d training images", source,
             meta["model"], meta["step"], len(train))
    probs += evaluate_lib.predict_dataset(evaluate_lib.make_predict_fn(teacher, "flip"),
                                          train.images, batch_size,
                                          progress=f"distilling from {source}")
  probs = (probs / len(teachers)).astype(np.float32)
  if path and parallel.is_primary():
    tmp = path + ".tmp.npz"
    try:  # Only a saving: a failed write costs a resume the predictions, not the run.
      np.savez(tmp, probs=probs, sources=np.array(sources), steps=np.array(steps),
               fingerprint=np.array(fingerprint), class_names=np.array(class_names))
      os.replace(tmp, path)  # Atomic: a resume never reads half a file.
    except OSError as e:
      log.warning("could not save the teachers' predictions to %s (%s); a resume will "
                  "predict again", path, e)
  return probs


def _load_saved_predictions(path: str) -> dict[str, np.ndarray]:
  """The arrays of a ``TEACHER_FILE`` (``class_names`` only in files written since it was added)."""
  with np.load(path, allow_pickle=False) as f:
    saved = {k: f[k] for k in ("probs", "sources", "steps", "fingerprint")}
    if "class_names" in f:
      saved["class_names"] = f["class_names"]
  return saved


def _read_saved_predictions(path: str) -> dict[str, np.ndarray] | None:
  """The arrays of a ``TEACHER_FILE``, or None (with a warning) if it cannot be read."""
  try:
    return _load_saved_predictions(path)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    log.warning("%s is unreadable (%s); predicting again", path, e)
    return None
