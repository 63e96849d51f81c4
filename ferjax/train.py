"""Training: the loss, jitted train and eval steps, and the resumable training loop.

Protocol: learn on Training, select the checkpoint on PublicTest, report
PrivateTest. The steps work on the model's split state (``nnx.split`` around
``jax.jit``), which costs less Python per call than ``nnx.jit`` at these model
sizes (BUILD_NOTES.md). Augmentation runs inside the step; metrics accumulate
on the device and are read a step late, so the loop never waits on the device
except at evaluations and checkpoints. A run's data and splits (``ferjax.splits``),
its folder and records (``ferjax.workdir``) and distillation (``ferjax.distill``)
live in modules of their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ferjax import __version__
from ferjax import checkpoint as checkpoint_lib
from ferjax import data as data_lib
from ferjax import distill
from ferjax import evaluate as evaluate_lib
from ferjax import parallel
from ferjax import splits
from ferjax import warmstart
from ferjax import workdir as workdir_lib
from ferjax.augment import augment, mix_batch
from ferjax.config import TrainConfig
from ferjax.errors import ConfigError, TrainingDivergedError
from ferjax.input_pipeline import TrainBatches
from ferjax.models import create_model
from ferjax.preprocess import preprocess

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def build_model(config: TrainConfig, num_classes: int) -> nnx.Module:
  """The model a config describes, initialised from its seed."""
  return create_model(config.model, num_classes=num_classes,
                      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
                      **config.model_overrides)


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optax optimiser: clipping, warm-up + cosine schedule, weight decay on kernels."""
  schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)

  def decay_mask(params):  # Decay weight matrices and kernels, not biases, norms or queries.
    return jax.tree.map(lambda p: p.ndim > 1, params)

  if config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
  else:  # adam: L2 on the loss gradient, as classic Adam does.
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.adam(schedule))
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx


def learning_rate_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int
                           ) -> optax.Schedule:
  """Linear warm-up to ``learning_rate``, then cosine decay to 1e-3 of it.

  With ``swa_epochs``, the cosine decay ends at ``swa_lr`` where the averaged
  epochs begin, and the rate stays there to the end. Where every epoch is
  averaged, the warm-up leads to ``swa_lr`` and the rate stays there.
  """
  swa_steps = min(config.swa_epochs * steps_per_epoch, total_steps)
  decay_steps = total_steps - swa_steps
  if config.swa_epochs and not decay_steps:
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    if not warmup:
      return optax.constant_schedule(config.swa_lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.swa_lr, warmup), optax.constant_schedule(config.swa_lr)],
        [warmup])
  warmup = min(int(config.warmup_epochs * steps_per_epoch), max(decay_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1),
      end_value=config.swa_lr if config.swa_epochs else config.learning_rate * 1e-3)
  if not config.swa_epochs:
    return schedule
  return optax.join_schedules([schedule, optax.constant_schedule(config.swa_lr)], [decay_steps])


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
  """Per-class loss weights, normalised to a mean of 1 over the training examples.

  ``balanced`` weighs each class by 1/frequency, ``sqrt`` by 1/sqrt(frequency)
  (milder: disgust is 1.5 % of FER2013), ``none`` weighs all alike.
  """
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  if mode == "none":
    w = np.ones(num_classes)
  else:
    freq = np.maximum(counts, 1) / counts.sum()
    w = 1.0 / freq if mode == "balanced" else 1.0 / np.sqrt(freq)
  w = w / (w[labels].mean() if len(labels) else 1.0)
  return w.astype(np.float32)


def loss_fn(logits_BxC: jax.Array, labels_B: jax.Array, weights_C: jax.Array,
            label_smoothing: float, soft_labels_BxC: jax.Array | None = None, *,
            example_weights_B: jax.Array | None = None) -> jax.Array:
  """Weighted cross-entropy on logits (never on probabilities) with label smoothing.

  Each example weighs its class's weight, or ``example_weights_B`` where given
  (mixed faces weigh the mix of their two classes' weights).

  Args:
    logits_BxC: the model's logits.
    labels_B: int class labels (index the class weights, and the one-hot
      targets when there are no soft labels).
    weights_C: per-class loss weights (:func:`class_weights`).
    label_smoothing: smoothing applied to the targets (0 for none).
    soft_labels_BxC: target distributions to use instead of one-hot labels.
    example_weights_B: per-example weights to use instead of ``weights_C``.

  Returns:
    The scalar weighted mean loss: ``sum(w * ce) / sum(w)``.
  """
  c = logits_BxC.shape[-1]
  targets = (jax.nn.one_hot(labels_B, c) if soft_labels_BxC is None else soft_labels_BxC)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits_BxC, targets)
  w = weights_C[labels_B] if example_weights_B is None else example_weights_B
  return jnp.sum(w * per_example) / jnp.sum(w)


class Trainer:
  """Holds a model's split state on a mesh and its compiled train and predict steps.

  Attributes:
    state: ``{"model", "optimizer", "ema", "swa"}`` — the model's parameters
      and BatchNorm statistics, the optimiser state, the parameter EMA (None
      when off), and the weight average of ``swa_epochs`` (``{"params",
      "count"}``; None when off). This is what checkpoints hold.
  """

  def __init__(self, config: TrainConfig, num_classes: int, mesh, *, total_steps: int,
               steps_per_epoch: int, weights: np.ndarray):
    self.config = config
    self.mesh = mesh
    model = build_model(config, num_classes)
    optimizer = nnx.Optimizer(model, make_optimizer(config, total_steps, steps_per_epoch),
                              wrt=nnx.Param)
    self.graphdef, self.rng_state, model_state = nnx.split(model, nnx.RngState, ...)
    self.opt_graphdef, opt_state = nnx.split(optimizer)
    eval_model = nnx.clone(model)
    eval_model.eval()  # Dropout off, BatchNorm on running statistics.
    self.eval_graphdef = nnx.graphdef(eval_model)
    # A copy: the EMA must not share (donated) buffers with the parameters.
    ema = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)) if config.ema_decay else None
    swa = ({"params": jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)),
            "count": jnp.zeros((), jnp.float32)} if config.swa_epochs else None)
    self.state = jax.device_put({"model": model_state, "optimizer": opt_state, "ema": ema,
                                 "swa": swa}, parallel.replicated(mesh))
    self._weights = jnp.asarray(weights)
    self._train_step_jit = jax.jit(self._train_step, donate_argnums=1)
    self._swa_update = jax.jit(self._swa_update_impl, donate_argnums=1)
    # Replicated out: in a multi-host run every process reads all of a batch's predictions
    # (sharded, they would span other processes' devices and could not be fetched).
    self._predict = jax.jit(self._predict_impl, static_argnames="tta",
                            out_shardings=parallel.replicated(mesh))

  def start_from(self, source: nnx.Module) -> list[str]:
    """Replaces the fresh weights (parameters, BatchNorm statistics, EMA) by ``source``'s.

    Returns the names of the weights left as initialised because their shape
    differs (:func:`ferjax.warmstart.copy_weights`).
    """
    model_state, kept = warmstart.copy_weights(self.state["model"], source)
    ema = self.state["ema"]
    if ema is not None:  # A copy: the EMA must not share (donated) buffers with the model.
      model = nnx.merge(self.graphdef, self.rng_state, model_state)
      ema = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    self.state = {**self.state, **jax.device_put({"model": model_state, "ema": ema},
                                                 parallel.replicated(self.mesh))}
    return kept

  def train_step(self, state, metrics: Metrics, batch: Batch, step: jax.Array):
    """One optimiser step; returns the new state and the updated metric sums."""
    return self._train_step_jit(self.rng_state, state, metrics, batch, step)

  def zero_metrics(self) -> Metrics:
    """Zeroed metric sums (loss, correct, count, nonfinite), replicated on the mesh."""
    return jax.device_put({k: jnp.zeros((), jnp.float32)
                           for k in ("loss", "correct", "count", "nonfinite")},
                          parallel.replicated(self.mesh))

  def _train_step(self, rng_state, state, metrics: Metrics, batch: Batch, step: jax.Array):
    config = self.config
    model = nnx.merge(self.graphdef, rng_state, state["model"])
    optimizer = nnx.merge(self.opt_graphdef, state["optimizer"])
    # Randomness is a pure function of (seed, step): resuming replays it exactly. Mixing
    # has a key of its own: augment() already splits aug_key, and with JAX's default
    # (partitionable) threefry split(k)[i] is fold_in(k, i), so fold_in(aug_key, 1) would
    # be erasing's key: the erased and the mixed faces' coin flips from the same bits.
    # (There, too, a split in three starts with the keys a split in two gives: runs
    # without mixing draw as before.)
    aug_key, dropout_key, mix_key = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), step), 3)
    nnx.reseed(model, dropout=dropout_key)
    x = augment(aug_key, preprocess(batch["image"]), config.augment)
    targets, example_weights = batch.get("soft_label"), None
    if config.augment.mixes:
      if targets is None:
        targets = jax.nn.one_hot(batch["label"], self._weights.shape[0])
      x, targets, example_weights = mix_batch(
          mix_key, x, targets, self._weights[batch["label"]],
          config.augment)

    def loss_of(model):
      logits = model(x)
      return loss_fn(logits, batch["label"], self._weights, config.label_smoothing,
                     targets, example_weights_B=example_weights), logits

    (loss, logits), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
    optimizer.update(model, grads)
    _, _, model_state = nnx.split(model, nnx.RngState, ...)
    _, opt_state = nnx.split(optimizer)
    ema = state["ema"]
    if ema is not None:
      d = config.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, nnx.state(model, nnx.Param))
    b = batch["label"].shape[0]
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    # Steps whose gradients were not finite: their update spoilt the parameters even
    # when the loss (computed before the update) was still finite.
    bad = jnp.logical_not(jnp.isfinite(optax.tree.norm(grads)))
    metrics = {"loss": metrics["loss"] + loss * b, "correct": metrics["correct"] + correct,
               "count": metrics["count"] + b, "nonfinite": metrics["nonfinite"] + bad}
    return {"model": model_state, "optimizer": opt_state, "ema": ema, "swa": state["swa"]}, metrics

  def _swa_update_impl(self, rng_state, swa, model_state):
    model = nnx.merge(self.graphdef, rng_state, model_state)
    count = swa["count"] + 1
    params = jax.tree.map(lambda a, p: a + (p - a) / count, swa["params"],
                          nnx.state(model, nnx.Param))
    return {"params": params, "count": count}

  def update_swa(self) -> None:
    """Adds the current parameters to the weight average (on the device; no host sync)."""
    swa = self._swa_update(self.rng_state, self.state["swa"], self.state["model"])
    self.state = {**self.state, "swa": swa}

  def swa_model(self) -> nnx.Module:
    """The model (eval mode) with the averaged parameters and the current BatchNorm statistics."""
    model = nnx.merge(self.eval_graphdef, self.rng_state, self.state["model"])
    model = nnx.clone(model)  # Own variables: nnx.merge shares the state's arrays.
    nnx.update(model, jax.tree.map(jnp.copy, self.state["swa"]["params"]))
    return model

  def _predict_impl(self, rng_state, model_state, ema, images, tta: str):
    model = nnx.merge(self.eval_graphdef, rng_state, model_state)
    if ema is not None:
      nnx.update(model, ema)
    return evaluate_lib.predict_probs(model, images, tta)

  def predict(self, images: jax.Array, tta: str = "none") -> jax.Array:
    """Probabilities for a uint8 batch under the current (or EMA) parameters."""
    return self._predict(self.rng_state, self.state["model"], self.state["ema"], images, tta=tta)

  def predict_dataset(self, images: np.ndarray, tta: str = "none",
                      progress: str | None = None) -> np.ndarray:
    """Probabilities ``(N, C)`` for every image, in fixed-shape batches sharded over the mesh."""
    return evaluate_lib.predict_dataset(
        lambda x: self.predict(x, tta), images, self.config.eval_batch_size,
        shard=lambda b: parallel.shard_batch(b, self.mesh), progress=progress)

  def abstract_state(self) -> dict[str, Any]:
    """Shapes, dtypes and shardings of :attr:`state`: what a checkpoint is restored into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        self.state)


def train_and_evaluate(config: TrainConfig, workdir: str, *, data: data_lib.FerData | None = None,
                       data_path: str | None = None, ferplus_path: str | None = None,
                       fresh: bool = False, on_error: str = "raise",
                       hooks: Sequence[Callable[[int], None]] = ()) -> dict:
  """Trains (or resumes) a run in ``workdir`` and evaluates its best checkpoint.

  Args:
    config: what to train.
    workdir: where checkpoints, ``metrics.jsonl``, curves and results go; the
      same command on the same workdir resumes from the latest checkpoint.
    data: the data set (else loaded from ``data_path`` / ``FER2013_PATH``),
      with the label set ``config.labels`` names (FER+:
      :func:`ferjax.data.with_ferplus_labels`).
    data_path: FER2013 in any form :func:`ferjax.data.load_fer2013` reads.
    ferplus_path: ``fer2013new.csv`` for ``labels="ferplus"``.
    fresh: move an existing run in ``workdir`` aside and start over.
    on_error: ``skip`` drops malformed data rows instead of failing.
    hooks: called with the number of finished steps after every step.

  Returns:
    The final results (also written to ``workdir/results.json``).

  Raises:
    TypeError: ``data`` is not a FerData.
    ConfigError: bad settings or ``workdir``, or ``data`` of another label set
      than ``config.labels``.
  """
  locks: list[int | None] = []
  with contextlib.ExitStack() as cleanup:  # Closed last to first, also on an error.
    cleanup.callback(_release_locks, locks)
    return _train_and_evaluate(config, os.path.abspath(workdir), data=data, data_path=data_path,
                               ferplus_path=ferplus_path, fresh=fresh, on_error=on_error,
                               hooks=hooks, locks=locks, cleanup=cleanup)


def _release_locks(locks: list[int | None]) -> None:
  for fd in locks:
    if fd is not None:
      os.close(fd)  # Releases the workdir's lock.


def _train_and_evaluate(config: TrainConfig, workdir: str, *, data, data_path, ferplus_path,
                        fresh: bool, on_error: str, hooks, locks: list[int | None],
                        cleanup: contextlib.ExitStack) -> dict:
  if data is None:
    data = splits.load_run_data(config, data_path, ferplus_path=ferplus_path, on_error=on_error)
  else:
    splits.check_run_data(config, data)
  config, data = splits.resolve_splits(config, data)
  train, val, test = (data.split(getattr(config, f)) for f in
                      ("train_split", "eval_split", "test_split"))
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "--eval_batch_size")
  _check_before_writing(config, data.num_classes, len(train))
  teachers = distill.load_teachers(config, data.class_names, workdir, train)
  init_source = warmstart.load_source(config, workdir)
  data_digest = {getattr(config, f): splits.fingerprint(split) for f, split in
                 (("train_split", train), ("eval_split", val), ("test_split", test))}
  if parallel.is_primary() and os.path.isdir(workdir):
    # Before --fresh moves anything: a run that another process is training is left alone.
    locks.append(workdir_lib.lock_workdir(workdir))
  workdir_lib.prepare_workdir(workdir, config, fresh=fresh, data_digest=data_digest)
  held = [fd for fd in locks if fd is not None]
  if parallel.is_primary() and not any(workdir_lib.same_folder(fd, workdir) for fd in held):
    locks.append(workdir_lib.lock_workdir(workdir))  # A new folder (--fresh, or a first run).
  # Every process has read the workdir (and process 0 moved an old run aside) before any
  # file is written; from here only process 0 writes the run's files (checkpoints: all).
  parallel.barrier("prepare_workdir")

  batches = TrainBatches(train.images, train.labels, config.batch_size, config.seed,
                         soft_labels=distill.training_targets(config, train, data.class_names,
                                                             teachers, workdir=workdir))
  steps_per_epoch = batches.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  stop_step = min(total_steps, config.max_steps or total_steps)
  swa_from_step = (config.epochs - config.swa_epochs) * steps_per_epoch  # Averaged after it.
  eval_every = config.eval_every or steps_per_epoch
  trainer = Trainer(config, data.num_classes, mesh, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch,
                    weights=class_weights(train.labels, data.num_classes, config.class_weighting))
  store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"))
  cleanup.callback(store.close)
  meta = {"config": config.to_dict(), "model": config.model, "labels": config.labels,
          "class_names": list(data.class_names), "num_classes": data.num_classes,
          "ferjax_version": __version__, "data_digest": data_digest}
  if parallel.is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(meta, f, indent=2)

  step = 0
  best_accuracy = -1.0
  elapsed_before = 0.0  # Training time of earlier sessions of this run (resumes).
  metrics = trainer.zero_metrics()  # Sums since the last evaluation.
  if parallel.is_primary():
    workdir_lib.drop_records_after(workdir, store.latest_step() or 0)
  if init_source is not None and store.latest_step() is None:
    source_model, source_meta = init_source
    kept = trainer.start_from(source_model)
    log.info("starting from %s (step %d)%s", config.init_from, source_meta["step"],
             f"; as initialised, for their shape: {', '.join(kept)}" if kept else "")
  del init_source
  if store.latest_step() is not None:
    step = store.latest_step()
    saved = store.read_meta(step)
    # A checkpoint between evaluations (--checkpoint_every) carries its own clock and the
    # metric sums since the last evaluation; one at an evaluation matches its record.
    elapsed_before = saved.get("elapsed_seconds",
                               workdir_lib.last_record(workdir).get("elapsed_seconds", 0.0))
    restored = store.restore(step, **{k: v for k, v in trainer.abstract_state().items()
                                      if v is not None})
    trainer.state = {**trainer.state, **restored}
    if "train_sums" in saved:
      resumed_sums = {k: jnp.asarray(saved["train_sums"][k], jnp.float32) for k in metrics}
      metrics = jax.device_put(resumed_sums, parallel.replicated(mesh))
    best = store.best_step()
    if best is not None:
      best_accuracy = workdir_lib.best_accuracy(workdir, best)
    log.info("resuming %s from step %d (epoch %.2f)", workdir, step, step / steps_per_epoch)
  _log_setup(config, data, train, val, mesh, steps_per_epoch, stop_step, workdir)

  writer = workdir_lib.summary_writer(workdir)
  progress = _Progress(steps_per_epoch, config.batch_size)
  previous = None
  run_start = time.monotonic()
  first_step, start_step = True, step
  while step < stop_step:
    if step % steps_per_epoch == 0 or previous is None:
      progress.start_epoch(step)
    batch = parallel.shard_batch(batches.batch(step), mesh)
    trainer.state, new_metrics = trainer.train_step(trainer.state, metrics, batch,
                                                    jnp.asarray(step, jnp.int32))
    step += 1
    if config.swa_epochs and step > swa_from_step and step % steps_per_epoch == 0:
      trainer.update_swa()
    if first_step:
      # The one host sync outside evaluations and checkpoints: the first step compiles
      # (on a GPU, with autotuning, a minute or more), which images/s and the ETA leave out.
      jax.block_until_ready(new_metrics)
      log.info("compiled and ran the first training step in %.1fs",
               time.monotonic() - progress.epoch_start)
      progress.restart_clock(step)
      first_step = False
    progress.current = step
    if previous is not None and progress.wants_update():
      progress.update(step, jax.device_get(previous))  # A step late: no stall.
    previous, metrics = metrics, new_metrics
    for hook in hooks:
      hook(step)
    at_eval = step % eval_every == 0 or step == stop_step
    at_checkpoint = config.checkpoint_every and step % config.checkpoint_every == 0
    if not (at_eval or at_checkpoint):
      continue
    train_metrics = _check_finite(jax.device_get(metrics), step, store)
    if at_eval:
      rate = progress.images_per_second()
      record = _evaluate_step(trainer, val, data.class_names, config, step, steps_per_epoch,
                              train_metrics, rate, elapsed_before + time.monotonic() - run_start)
      best_accuracy = max(best_accuracy, record["eval_accuracy"])
      record["best_eval_accuracy"] = best_accuracy
      progress.finish_epoch(record)
      workdir_lib.write_record(workdir, record, writer)
      store.save(step, model=trainer.state["model"], optimizer=trainer.state["optimizer"],
                 ema=trainer.state["ema"], swa=trainer.state["swa"],
                 meta={**meta, "step": step, "metrics": record},
                 eval_accuracy=record["eval_accuracy"])
      metrics = trainer.zero_metrics()
      previous = None
    else:
      store.save(step, model=trainer.state["model"], optimizer=trainer.state["optimizer"],
                 ema=trainer.state["ema"], swa=trainer.state["swa"],
                 meta={**meta, "step": step,
                       "elapsed_seconds": elapsed_before + time.monotonic() - run_start,
                       "train_sums": {k: float(v) for k, v in train_metrics.items()}})
  progress.close()
  if writer is not None:
    writer.close()
  if step == start_step:  # A finished run started again: its report stands if it is complete.
    done = workdir_lib.finished_results(workdir, store, swa=bool(config.swa_epochs))
    if done is not None:
      log.info("%s: nothing left to train (step %d); its results (best step %d) are in "
               "results.json", workdir, step, done["best_step"])
      return done
  return _final_evaluation(trainer, store, (train, val, test), data.class_names, config, workdir,
                           swa_from_step=swa_from_step, steps_per_epoch=steps_per_epoch)


def _check_before_writing(config: TrainConfig, num_classes: int, num_train: int) -> None:
  """Config errors that would otherwise surface after the workdir is made."""
  if config.batch_size > num_train:
    raise ConfigError(f"--batch_size={config.batch_size} is larger than the {num_train} "
                      f"examples of {config.train_split}")
  try:  # Builds the model abstractly: bad --model_option values fail here, cheaply.
    nnx.eval_shape(lambda: build_model(config, num_classes))
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    options = " ".join(f"{k}={v!r}" for k, v in config.model_overrides.items())
    raise ConfigError(f"model {config.model!r} with options {options or '(none)'}: "
                      f"{e}") from None


def _check_finite(metrics: dict, step: int, store) -> dict:
  """Stops a diverged run before anything is saved; every kept checkpoint is good."""
  loss, nonfinite = float(metrics["loss"]), int(metrics["nonfinite"])
  if math.isfinite(loss) and not nonfinite:
    return metrics
  last = store.latest_step()
  kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
      "no checkpoint was written"
  what = (f"the training loss became {loss}" if not math.isfinite(loss) else
          f"the gradients of {nonfinite} step(s) were not finite")
  raise TrainingDivergedError(f"{what} by step {step}; {kept}. "
                              "Try a lower --learning_rate or --grad_clip")


def _evaluate_step(trainer: Trainer, val, class_names, config, step, steps_per_epoch,
                   train_metrics, images_per_second, elapsed) -> dict:
  t = time.monotonic()
  probs = trainer.predict_dataset(val.images)
  m = evaluate_lib.classification_metrics(probs, val.labels, class_names)
  count = max(float(train_metrics["count"]), 1.0)
  record = {
      "step": step,
      "epoch": round(step / steps_per_epoch, 4),
      "train_loss": float(train_metrics["loss"]) / count,
      "train_accuracy": float(train_metrics["correct"]) / count,
      "eval_split": config.eval_split,
      "eval_loss": m["loss"],
      "eval_accuracy": m["accuracy"],
      "eval_macro_f1": m["macro_f1"],
      "images_per_second": round(images_per_second, 1),
      "eval_seconds": round(time.monotonic() - t, 2),
      "elapsed_seconds": round(elapsed, 1),
  }
  return record


def _final_evaluation(trainer: Trainer, store, run_splits, class_names, config, workdir, *,
                      swa_from_step: int, steps_per_epoch: int) -> dict:
  """Reports the best checkpoint on the test split, and the weight average where kept.

  With ``swa_epochs`` the average (BatchNorm statistics recomputed on the
  training faces) is the run's result: ``test_tta_*`` are its metrics, the best
  checkpoint's move to ``best_checkpoint``, and the model is written to
  ``workdir/swa`` as an inference checkpoint that evaluation, realtime and
  ``Predictor`` read like a workdir.
  """
  train, val, test = run_splits
  swa = trainer.state["swa"]
  swa_count = 0 if swa is None else int(jax.device_get(swa["count"]))
  swa_model = trainer.swa_model() if swa_count else None
  best = store.resolve("best")
  restored = store.restore(best, **{k: v for k, v in trainer.abstract_state().items()
                                    if v is not None and k not in ("optimizer", "swa")})
  trainer.state = {**trainer.state, **restored}
  last = workdir_lib.last_record(workdir)
  results = {"model": config.model, "labels": config.labels, "best_step": best,
             "selected_on": config.eval_split, "test_split": config.test_split,
             "epochs_trained": last.get("epoch"), "train_seconds": last.get("elapsed_seconds"),
             "best_eval_accuracy": last.get("best_eval_accuracy"),
             "ferjax_version": __version__, "config": config.to_dict(),
             "device": {"platform": jax.devices()[0].platform,
                        "kind": jax.devices()[0].device_kind, "count": jax.device_count()}}
  for tta in evaluate_lib.TTA_MODES:
    probs = trainer.predict_dataset(test.images, tta,
                                    progress=f"{config.test_split} (tta={tta})")
    m = evaluate_lib.classification_metrics(probs, test.labels, class_names)
    results[f"test_tta_{tta}"] = m
    log.info("%s", evaluate_lib.format_metrics(
        m, f"{config.test_split} (checkpoint step {best}, tta={tta})"))
  if swa is not None:
    results = _report_swa(results, swa_model, swa_count, run_splits,
                          class_names, config, workdir, swa_from_step, steps_per_epoch)
  if parallel.is_primary():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def _report_swa(results: dict, model, count: int, run_splits, class_names,
                config: TrainConfig, workdir: str, swa_from_step: int,
                steps_per_epoch: int) -> dict:
  """``results`` with the weight average's metrics in front (see ``_final_evaluation``)."""
  from ferjax import recalibrate

  train, val, test = run_splits
  first_epoch = swa_from_step // steps_per_epoch + 1
  summary = {"count": count, "epochs": list(range(first_epoch, first_epoch + count)),
             "learning_rate": config.swa_lr}
  if not count:
    log.warning("no averaged epoch finished (the run stopped at --max_steps before epoch %d); "
                "the best checkpoint is the result", first_epoch)
    return {**results, "swa": summary}
  recalibrated = recalibrate.batch_norm_layers(model)
  if recalibrated:
    model = recalibrate.recalibrate_batch_norm(model, train.images, seed=config.seed)

  def metrics(split, tta="none", progress=None):
    return evaluate_lib.model_metrics(model, split, class_names, tta,
                                      batch_size=config.eval_batch_size, progress=progress)

  eval_accuracy = metrics(val)["accuracy"]
  summary = {**summary, "batch_norm_recalibrated": bool(recalibrated),
             "eval_accuracy": eval_accuracy, "folder": "swa"}
  best = {"step": results["best_step"], "eval_accuracy": results["best_eval_accuracy"],
          **{f"test_tta_{tta}": results[f"test_tta_{tta}"] for tta in evaluate_lib.TTA_MODES}}
  results = {**results, "swa": summary, "best_checkpoint": best}
  for tta in evaluate_lib.TTA_MODES:
    m = metrics(test, tta, progress=f"{config.test_split} (average, tta={tta})")
    results[f"test_tta_{tta}"] = m
    log.info("%s", evaluate_lib.format_metrics(
        m, f"{config.test_split} (average of epochs {summary['epochs'][0]}-"
           f"{summary['epochs'][-1]}, tta={tta})"))
  log.info("%s: %.2f%% for the average of %d epochs, %.2f%% for the best checkpoint "
           "(step %d)", config.eval_split, 100 * eval_accuracy, count,
           100 * best["eval_accuracy"], best["step"])
  if eval_accuracy < best["eval_accuracy"]:
    log.warning("the weight average scores below the best checkpoint on %s; that checkpoint's "
                "test metrics are in results.json under best_checkpoint", config.eval_split)
  meta = {"config": config.to_dict(), "model": config.model, "labels": config.labels,
          "class_names": list(class_names), "num_classes": len(class_names),
          "ferjax_version": __version__, "step": results["best_step"], "swa": summary}
  _write_swa_model(model, os.path.join(workdir, "swa"), meta, eval_accuracy)
  return results


def _write_swa_model(model, folder: str, meta: dict, eval_accuracy: float) -> None:
  """Writes the average's inference checkpoint under a temporary name, then swaps it in."""
  partial, old = folder + ".partial", folder + ".old"
  if parallel.is_primary():
    shutil.rmtree(partial, ignore_errors=True)
  parallel.barrier("swa_partial")
  checkpoint_lib.save_inference_checkpoint(model, partial, meta, eval_accuracy=eval_accuracy)
  if parallel.is_primary():
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
      os.rename(folder, old)
    os.rename(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
  parallel.barrier("swa_written")


def _log_setup(config, data, train, val, mesh, steps_per_epoch, stop_step, workdir) -> None:
  devices = mesh.devices.size
  log.info("ferjax %s | model %s | %s labels (%d classes) | %d device%s (%s)", __version__,
           config.model, config.labels, data.num_classes, devices, "" if devices == 1 else "s",
           jax.devices()[0].platform)
  log.info("train %s: %d | select on %s: %d | report %s | batch %d, %d steps/epoch, "
           "stopping at step %d | workdir %s", config.train_split, len(train), config.eval_split,
           len(val), config.test_split, config.batch_size, steps_per_epoch, stop_step, workdir)


class _Progress:
  """A per-epoch progress bar with images/s and ETA, and one line per epoch."""

  def __init__(self, steps_per_epoch: int, batch_size: int):
    self.steps_per_epoch = steps_per_epoch
    self.batch_size = batch_size
    self.interactive = sys.stderr.isatty()
    self.bar = None
    self._t0 = time.monotonic()
    self._step0 = 0
    self.current = 0
    self._last_print = time.monotonic()

  def start_epoch(self, step: int) -> None:
    self.close()
    self._t0, self._step0 = time.monotonic(), step
    self.current = step
    self._last_print = self._t0
    epoch = step // self.steps_per_epoch + 1
    if self.interactive:
      from tqdm import tqdm
      self.bar = tqdm(total=self.steps_per_epoch * self.batch_size, unit="img", unit_scale=True,
                      initial=(step % self.steps_per_epoch) * self.batch_size,
                      desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

  @property
  def epoch_start(self) -> float:
    return self._t0

  def restart_clock(self, step: int) -> None:
    """Counts images/s and the ETA from ``step`` on (after the compiling first step)."""
    self._t0, self._step0 = time.monotonic(), step
    self._last_print = self._t0

  def wants_update(self) -> bool:
    return self.bar is not None or time.monotonic() - self._last_print > 60

  def update(self, step: int, metrics: dict) -> None:
    if not float(metrics["count"]):
      return
    count = float(metrics["count"])
    loss, acc = float(metrics["loss"]) / count, float(metrics["correct"]) / count
    if self.bar is not None:
      self.bar.n = (step - 1) % self.steps_per_epoch * self.batch_size + self.batch_size
      self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
      self.bar.update(0)
    else:
      self._last_print = time.monotonic()
      done = (step - 1) % self.steps_per_epoch + 1
      rate = self.images_per_second()
      eta = (self.steps_per_epoch - done) * self.batch_size / max(rate, 1e-9)
      log.info("epoch %d: step %d/%d, loss %.4f, acc %.4f, %.0f img/s, epoch ETA %.0fs",
               (step - 1) // self.steps_per_epoch + 1, done, self.steps_per_epoch, loss, acc,
               rate, eta)

  def images_per_second(self) -> float:
    """Training images per second this epoch; call right after a device sync."""
    return (self.current - self._step0) * self.batch_size / max(time.monotonic() - self._t0, 1e-9)

  def finish_epoch(self, record: dict) -> None:
    self.close()
    log.info("epoch %.2f (step %d): train loss %.4f acc %.2f%% | %s loss %.4f acc %.2f%% "
             "(best %.2f%%) | %.0f img/s | %.0fs elapsed", record["epoch"], record["step"],
             record["train_loss"], 100 * record["train_accuracy"], record["eval_split"],
             record["eval_loss"], 100 * record["eval_accuracy"],
             100 * record["best_eval_accuracy"],
             record["images_per_second"], record["elapsed_seconds"])

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
