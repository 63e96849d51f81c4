"""BatchNorm statistics recomputed on the training faces as they are, after training.

A model trained with augmentation ends with BatchNorm running statistics of
augmented faces (shifted, rotated, rescaled, with blank borders), and those of
its last few dozen steps only (momentum 0.9); it is evaluated on faces as they
are. Recomputing the statistics on the training split without augmentation or
dropout, averaged over the whole split, removes that mismatch. No parameter
changes, nothing is learnt from the evaluation or test splits, and the model's
cost is the same. Measurements (BUILD_NOTES.md, Results): +0.8 points on
PrivateTest for the strongest ``vgg_alstm``; the same averaging over augmented
faces gains nothing, so it is the augmentation, not the noise of the running
average, that the recomputed statistics remove.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferjax.errors import CheckpointError, ConfigError, check_folder_path, is_whole

log = logging.getLogger("ferjax.recalibrate")


def batch_norm_layers(model) -> list[tuple[str, Any]]:
  """``(path, layer)`` of every ``nnx.BatchNorm`` in ``model``, in graph order."""
  from flax import nnx

  return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, nnx.BatchNorm)]


def model_has_batch_norm(model: str, model_overrides: dict | None = None) -> bool:
  """Whether the registered ``model`` with these options has a BatchNorm layer."""
  from flax import nnx

  from ferjax.models import create_model

  abstract = nnx.eval_shape(lambda: create_model(model, num_classes=7, rngs=nnx.Rngs(0),
                                                 **(model_overrides or {})))
  return bool(batch_norm_layers(abstract))


def recalibrate_batch_norm(model, images: np.ndarray, *, batch_size: int = 256, seed: int = 0,
                           log_every_s: float = 30.0):
  """A copy of ``model`` whose BatchNorm statistics are those of ``images``.

  Each BatchNorm layer's running mean and variance become the mean, over
  ``len(images) // batch_size`` batches of ``batch_size`` faces (in an order
  shuffled with ``seed``; the remaining ``len(images) % batch_size`` faces are
  left out, so every batch has the same shape), of that layer's batch mean and
  variance, computed in train-mode BatchNorm on the faces as they are: no
  augmentation, no dropout. Parameters are copied unchanged, and ``model`` is
  left as it was. With fewer than ``batch_size`` faces, one batch of all of
  them is used.

  Args:
    model: a FER model (e.g. from :func:`ferjax.checkpoint.load_model`).
    images: uint8 faces ``(N, 48, 48, 1)``, normally the run's training split.
    batch_size: faces per batch.
    seed: the shuffling seed.
    log_every_s: seconds between progress lines (batches done, faces/s): a
      large model takes minutes over FER2013's training split on a CPU.

  Returns:
    The recalibrated copy, in eval mode.

  Raises:
    ConfigError: ``model`` is not a model, it has no BatchNorm layer (``dnn``,
      or ``batch_norm=false``), ``images`` is empty or not uint8 faces, or
      ``batch_size`` is not a whole number of at least 1.
  """
  from flax import nnx

  from ferjax.data import FerData
  from ferjax.models import check_model
  from ferjax.preprocess import preprocess

  check_model(model)
  if not batch_norm_layers(model):
    raise ConfigError(f"{type(model).__name__} has no BatchNorm layer: there are no "
                      "statistics to recompute")
  if isinstance(images, FerData):  # np.asarray would make a 0-d object array of it.
    raise ConfigError("recalibration takes the faces, not a FerData: pass its images, e.g. "
                      "data.split('Training').images")
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 or not len(images):
    raise ConfigError(f"recalibration needs uint8 faces (N, H, W, 1), N > 0; got "
                      f"{images.dtype} {images.shape}")
  # A whole number: 2.5 passed `< 1` and failed later as a TypeError from a slice.
  if not is_whole(batch_size, 1):
    raise ConfigError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
  batch_size = min(batch_size, len(images))
  steps = len(images) // batch_size
  order = np.random.default_rng(seed).permutation(len(images))[:steps * batch_size]
  graphdef, state = nnx.split(model)

  @jax.jit
  def batch_statistics(state, faces_BxHxWx1):
    copy = nnx.merge(graphdef, state)
    copy.eval()  # Dropout off; the BatchNorm layers are switched back below.
    norms = [m for _, m in batch_norm_layers(copy)]
    for norm in norms:
      # Momentum 0: the running statistics become this batch's statistics.
      norm.use_running_average, norm.momentum = False, 0.0
    copy(preprocess(faces_BxHxWx1))
    return [(norm.mean[...], norm.var[...]) for norm in norms]

  log.info("recomputing the statistics of %d BatchNorm layers over %d batches of %d faces",
           len(batch_norm_layers(model)), steps, batch_size)
  start = time.monotonic()
  last = start
  sums = None
  for i in range(steps):  # Sums stay on the device.
    stats = batch_statistics(state, images[order[i * batch_size:(i + 1) * batch_size]])
    previous, sums = sums, stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    if previous is None:
      continue
    # Waits for the sums a batch late, so the batch just queued keeps the device busy,
    # and dispatch cannot run ahead of the progress lines.
    jax.block_until_ready(previous)
    if time.monotonic() - last >= log_every_s:
      last = time.monotonic()
      log.info("BatchNorm statistics: %d/%d batches, %.0f faces/s", i, steps,
               i * batch_size / max(last - start, 1e-9))
  recalibrated = nnx.clone(model)  # New variables: nnx.merge would share the model's.
  for (_, norm), (mean_sum, var_sum) in zip(batch_norm_layers(recalibrated), sums):
    norm.mean[...], norm.var[...] = mean_sum / steps, var_sum / steps
  recalibrated.eval()
  jax.block_until_ready(nnx.state(recalibrated))
  log.info("recomputed the statistics of %d BatchNorm layers over %d batches of %d faces in "
           "%.1fs", len(sums), steps, batch_size, time.monotonic() - start)
  return recalibrated


def recalibrate_run(workdir: str, output: str, *, which: str | int = "best", data=None,
                    data_path: str | None = None, ferplus_path: str | None = None,
                    batch_size: int = 256, eval_batch_size: int = 256,
                    on_error: str = "raise") -> dict:
  """Recalibrates a run's checkpoint on its training split and writes a new run folder.

  ``output`` gets an inference-only checkpoint (as ``experiments.export_weights``
  writes; evaluate, realtime and ``Predictor`` read it like a workdir) and a
  ``results.json`` like a training run's: the run's own fields (epochs, training
  time, device, config), the eval split's accuracy before and after, and the
  test split's metrics after, plain and with each TTA. Everything is written
  under a temporary name first: a failed run leaves no ``output``.

  Args:
    workdir: the run (or its ``checkpoints/``).
    output: the folder to create; it must not exist yet.
    which: ``best``, ``latest`` or a step number.
    data, data_path, ferplus_path, on_error: the data, as
      :func:`ferjax.evaluate.evaluate_checkpoint` takes it; it must hold the
      run's training, eval and test splits.
    batch_size: faces per batch for the statistics.
    eval_batch_size: the evaluation batch.

  Returns:
    The ``results.json`` dict.
  """
  from ferjax import checkpoint as checkpoint_lib
  from ferjax import evaluate as evaluate_lib
  from ferjax.config import TrainConfig
  from ferjax.splits import load_run_data, resolve_splits

  output = os.path.abspath(os.fspath(output))
  if os.path.exists(output):
    raise CheckpointError(f"{output} already exists; remove it or choose another --output")
  check_folder_path(output, "output")
  model, meta = checkpoint_lib.load_model(workdir, which)
  if not batch_norm_layers(model):
    raise ConfigError(f"{workdir}: its {meta['model']} model has no BatchNorm layer; there "
                      "is nothing to recalibrate")
  config = TrainConfig.from_dict(meta["config"])
  if data is None:
    data = load_run_data(config, data_path, ferplus_path=ferplus_path, on_error=on_error)
  if tuple(data.class_names) != tuple(meta["class_names"]):
    raise ConfigError(f"the checkpoint predicts {meta['labels']} classes "
                      f"{list(meta['class_names'])}, the data has {list(data.class_names)}")
  config, data = resolve_splits(config, data)
  train, val, test = (data.split(getattr(config, f)) for f in
                      ("train_split", "eval_split", "test_split"))

  def accuracy(m, split, tta="none", progress=None):
    return evaluate_lib.model_metrics(m, split, meta["class_names"], tta,
                                      batch_size=eval_batch_size, progress=progress)

  log.info("%s: %s step %d; %s accuracy as trained", workdir, meta["model"], meta["step"],
           config.eval_split)
  before = accuracy(model, val)["accuracy"]
  start = time.monotonic()
  recalibrated = recalibrate_batch_norm(model, train.images, batch_size=batch_size,
                                        seed=config.seed)
  seconds = time.monotonic() - start
  after = accuracy(recalibrated, val)["accuracy"]
  log.info("%s (%s): accuracy %.2f%% as trained, %.2f%% recalibrated", config.eval_split,
           workdir, 100 * before, 100 * after)
  if after < before:
    log.warning("recalibration lowered the %s accuracy; the original stays in %s",
                config.eval_split, workdir)
  source_results = _read_results(workdir)
  per_batch = min(batch_size, len(train))
  recalibration = {"source": os.fspath(workdir), "step": meta["step"],
                   "split": config.train_split, "faces": len(train) // per_batch * per_batch,
                   "batch_size": per_batch, "seconds": round(seconds, 1),
                   "eval_split": config.eval_split,
                   "eval_accuracy_before": before, "eval_accuracy_after": after}
  results = {**{k: source_results[k] for k in ("epochs_trained", "train_seconds", "device",
                                               "ferjax_version") if k in source_results},
             "model": meta["model"], "labels": meta["labels"], "best_step": meta["step"],
             "selected_on": config.eval_split, "test_split": config.test_split,
             "best_eval_accuracy": after, "config": meta["config"],
             "batch_norm_recalibration": recalibration}
  for tta in evaluate_lib.TTA_MODES:
    # Progress lines as training's test evaluation prints them: ten-crop takes minutes.
    m = accuracy(recalibrated, test, tta, progress=f"{config.test_split} (tta={tta})")
    results[f"test_tta_{tta}"] = m
    log.info("%s", evaluate_lib.format_metrics(
        m, f"{config.test_split} (recalibrated step {meta['step']}, tta={tta})"))
  partial = output + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  try:
    checkpoint_lib.save_inference_checkpoint(
        recalibrated, partial, {**meta, "batch_norm_recalibration": recalibration},
        eval_accuracy=after)
    with open(os.path.join(partial, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    os.rename(partial, output)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return results


def _read_results(workdir: str) -> dict:
  """The run's own results.json (training time, epochs, device), or {} without one."""
  from ferjax.checkpoint import run_folder

  try:
    with open(os.path.join(run_folder(workdir), "results.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}
