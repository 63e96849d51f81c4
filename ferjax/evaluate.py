"""Exact evaluation: predictions over a whole split, test-time augmentation, metrics."""

from __future__ import annotations

import collections
import fractions
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ferjax.augment import affine_warp
from ferjax.errors import ConfigError, DataError, check_folder_path, is_whole
from ferjax.input_pipeline import eval_batches
from ferjax.preprocess import preprocess
from ferjax.splits import load_run_data, resolve_splits

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "ten_crop")
# ten_crop: five 44x44 crops (centre and corners) scaled back to 48x48, and their mirrors.
_CROP = 44


def tta_views(x_BxHxWxC: jax.Array, tta: str) -> jax.Array:
  """Stacks the test-time views of a preprocessed batch: ``(V, B, H, W, C)``."""
  if tta == "none":
    return x_BxHxWxC[None]
  flipped = x_BxHxWxC[:, :, ::-1]
  if tta == "flip":
    return jnp.stack([x_BxHxWxC, flipped])
  if tta != "ten_crop":
    raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
  b, h, w, _ = x_BxHxWxC.shape
  scale = jnp.full((b,), h / _CROP, jnp.float32)
  angle = jnp.zeros((b,), jnp.float32)
  d = (h - _CROP) / 2 * scale[0]  # Corner crops sit this far off centre after scaling.
  views = []
  for dy, dx in ((0, 0), (-d, -d), (-d, d), (d, -d), (d, d)):
    for flip in (False, True):
      # The warp mirrors after shifting, so the mirror of crop (dy, dx) uses -dx.
      shift = jnp.broadcast_to(jnp.asarray([dy, -dx if flip else dx], jnp.float32), (b, 2))
      views.append(affine_warp(x_BxHxWxC, angle, scale, shift, jnp.full((b,), flip)))
  return jnp.stack(views)


def predict_probs(model_fn: Callable[[jax.Array], jax.Array], images_BxHxWx1: jax.Array,
                  tta: str = "none") -> jax.Array:
  """Class probabilities for uint8 faces, averaged over the TTA views.

  Args:
    model_fn: maps preprocessed float images to logits (eval mode).
    images_BxHxWx1: uint8 faces.
    tta: ``none``, ``flip`` or ``ten_crop``.

  Returns:
    float32 ``(B, C)`` probabilities.
  """
  views_VxBxHxWxC = tta_views(preprocess(images_BxHxWx1), tta)
  v, b = views_VxBxHxWxC.shape[:2]
  logits = model_fn(views_VxBxHxWxC.reshape(v * b, *views_VxBxHxWxC.shape[2:]))
  return jax.nn.softmax(logits.reshape(v, b, -1), axis=-1).mean(axis=0)


def predict_dataset(predict_fn: Callable[[np.ndarray], jax.Array], images: np.ndarray,
                    batch_size: int, shard: Callable | None = None, *,
                    progress: str | None = None, log_every_s: float = 30.0,
                    in_flight: int = 4) -> np.ndarray:
  """Runs ``predict_fn`` over every image once, in fixed-shape padded batches.

  Up to ``in_flight`` batches are dispatched ahead of the one being fetched, so
  the device never waits on the host, and the progress lines follow the work
  as it is done (dispatching every batch first would let the runtime's own
  queue block the dispatch loop for most of the run, with no line meanwhile).

  Args:
    predict_fn: uint8 ``(batch_size, 48, 48, 1)`` → probabilities ``(batch_size, C)``.
    images: uint8 ``(N, 48, 48, 1)``.
    batch_size: the one batch shape used (the last batch is padded).
    shard: optional placement of each batch on devices.
    progress: a label; with it, the images done so far are logged about every
      ``log_every_s`` seconds (predicting FER2013's training set with a large
      teacher takes minutes on a CPU).
    log_every_s: seconds between progress lines.
    in_flight: batches dispatched ahead of the one being fetched.

  Returns:
    float32 ``(N, C)`` probabilities; padding rows are dropped.
  """
  pending: collections.deque = collections.deque()
  start = last = time.monotonic()
  done, results = 0, []

  def fetch_oldest():
    nonlocal done, last
    p, n = pending.popleft()
    results.append(np.asarray(p)[:n])
    done += n
    now = time.monotonic()
    if progress and now - last >= log_every_s and done < len(images):
      log.info("%s: %d/%d images, %.0f images/s", progress, done, len(images),
               done / (now - start))
      last = now

  dummy = np.zeros(len(images), np.int32)
  for batch in eval_batches(images, dummy, batch_size):
    x = batch["image"] if shard is None else shard({"image": batch["image"]})["image"]
    pending.append((predict_fn(x), int(batch["mask"].sum())))
    if len(pending) > in_flight:
      fetch_oldest()
  while pending:
    fetch_oldest()
  return np.concatenate(results).astype(np.float32)


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> dict:
  """Accuracy (with its 95 % interval), macro-F1, per-class scores, confusion, NLL, ECE.

  ``accuracy_ci95`` is the Wilson score interval of the accuracy as a binomial
  proportion over the ``N`` examples: the spread that the choice of test faces
  alone allows (on FER2013's 3,589 PrivateTest faces about ±1.5 points at 70 %),
  before any seed-to-seed spread. ``ece`` is the expected calibration error
  over ``ECE_BINS`` equal-width bins of the top probability: the mean gap, weighted
  by each bin's share of the examples, between the confidence a model shows and
  the accuracy it has.

  Args:
    probs: ``(N, C)`` predicted probabilities.
    labels: ``(N,)`` true labels.
    class_names: the C class names.

  Returns:
    A JSON-ready dict; ``confusion[i][j]`` counts true class i predicted as j.

  Raises:
    ConfigError: ``probs`` is not ``(N, len(class_names))``, or ``labels`` are
      not ``N`` class indices in ``0..C-1``.
  """
  probs, labels = np.asarray(probs), np.asarray(labels)
  c = len(class_names)
  # Checked here: each slip fails below as an IndexError that names no argument.
  if probs.ndim != 2 or probs.shape[1] != c:
    raise ConfigError(f"probs must be (N, {c}), one column per class name, got shape "
                      f"{probs.shape}")
  if labels.shape != (len(probs),) or (len(labels) and (
      not np.issubdtype(labels.dtype, np.integer) or not 0 <= labels.min() <= labels.max() < c)):
    raise ConfigError(f"labels must be {len(probs)} class indices (N,) in 0..{c - 1}, one per "
                      f"row of probs, got {labels.dtype} {labels.shape}"
                      + (f" with values {labels.min()}..{labels.max()}"
                         if labels.size and np.issubdtype(labels.dtype, np.number) else ""))
  pred = probs.argmax(axis=1)
  confusion = np.zeros((c, c), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  tp = np.diag(confusion).astype(np.float64)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c),
                 where=(precision + recall) > 0)
  present = support > 0
  nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
  return {
      "num_examples": int(len(labels)),
      "accuracy": float(tp.sum() / max(len(labels), 1)),
      "accuracy_ci95": wilson_interval(int(tp.sum()), len(labels)),
      "ece": expected_calibration_error(probs, labels),
      "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
      "loss": float(nll.mean()) if len(labels) else 0.0,
      "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                           "f1": float(f1[i]), "support": int(support[i])}
                    for i, name in enumerate(class_names)},
      "confusion": confusion.tolist(),
      "class_names": list(class_names),
  }


ECE_BINS = 15


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float]:
  """The Wilson score interval ``[low, high]`` of a proportion (95 % for the default ``z``).

  Unlike the normal approximation ``p ± z·sqrt(p(1-p)/n)`` it stays inside
  [0, 1] and keeps its coverage near 0 and 1. With no examples: ``[0, 1]``.
  """
  if not 0 <= successes <= max(n, 0):
    raise ValueError(f"successes must be in 0..n, got successes={successes}, n={n}")
  if n <= 0:
    return [0.0, 1.0]
  p = successes / n
  scale = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / scale
  half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return [max(0.0, centre - half), min(1.0, centre + half)]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
  """Σ_b (n_b / N)·|accuracy_b − confidence_b| over equal-width bins of the top probability."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if not len(labels):
    return 0.0
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of 0 joins the first.
  # Rounded first, so that a float32 0.8 (0.800000011...) stays on its edge's side.
  which = np.clip(np.ceil(np.round(confidence * bins, 6)).astype(np.int64) - 1, 0, bins - 1)
  gap = np.abs(np.bincount(which, correct, minlength=bins)
               - np.bincount(which, confidence, minlength=bins))
  return float(gap.sum() / len(labels))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
  """Two-sided exact McNemar p-value: the discordant pairs as a fair coin's tosses.

  Of the examples exactly one of two models gets right, ``only_a`` are model
  A's and ``only_b`` model B's. Under "equally accurate" each is A's with
  probability 1/2; the p-value is twice the binomial tail of the smaller count
  (at most 1). Exact integer arithmetic, so it holds for thousands of pairs.
  """
  if min(only_a, only_b) < 0:
    raise ValueError(f"counts must be at least 0, got {only_a} and {only_b}")
  n, k = only_a + only_b, min(only_a, only_b)
  term = tail = 1  # C(n, 0); each next term from the last: C(n, i) = C(n, i-1)·(n-i+1)/i.
  for i in range(1, k + 1):
    term = term * (n - i + 1) // i
    tail += term
  return min(1.0, float(fractions.Fraction(2 * tail, 2 ** n)))


def paired_comparison(probs: np.ndarray, baseline_probs: np.ndarray,
                      labels: np.ndarray) -> dict:
  """Two models' predictions on the same examples, compared pair by pair.

  More sensitive than comparing two accuracies' intervals: the faces both
  models get right, or both get wrong, say nothing about which is better, and
  McNemar's test (:func:`mcnemar_exact_p`) weighs only the others.

  Returns:
    ``accuracy`` and ``baseline_accuracy``, their ``difference``, the counts
    ``right_only_here`` and ``right_only_in_baseline``, ``num_examples`` and
    the two-sided ``p_value``.
  """
  probs, baseline_probs, labels = map(np.asarray, (probs, baseline_probs, labels))
  if probs.shape != baseline_probs.shape or labels.shape != probs.shape[:1]:
    raise ConfigError(f"the two models' probabilities must have one shape, one row per label: "
                      f"got {probs.shape} and {baseline_probs.shape} for {labels.shape} labels")
  right = probs.argmax(axis=1) == labels
  baseline_right = baseline_probs.argmax(axis=1) == labels
  only_here, only_there = int(np.sum(right & ~baseline_right)), int(np.sum(~right & baseline_right))
  n = max(len(labels), 1)
  return {"accuracy": float(right.sum() / n), "baseline_accuracy": float(baseline_right.sum() / n),
          "difference": (only_here - only_there) / n, "right_only_here": only_here,
          "right_only_in_baseline": only_there, "num_examples": int(len(labels)),
          "p_value": mcnemar_exact_p(only_here, only_there)}


MISTAKES_DRAWN = 256


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
  """Indices of the (at most) ``n`` wrong predictions with the highest top probability.

  Most confident first; ties keep the examples' order. FER2013 has many faces
  whose label is itself doubtful, and these are where a model and its label
  disagree most firmly.
  """
  probs, labels = np.asarray(probs), np.asarray(labels)
  wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
  order = np.argsort(-probs[wrong].max(axis=1), kind="stable")
  return wrong[order[:max(n, 0)]]


def format_comparison(baseline: dict) -> str:
  """One line for the ``baseline`` entry of :func:`evaluate_checkpoint`'s metrics."""
  return (f"against {baseline['workdir']} ({baseline['model']}, step {baseline['step']}): "
          f"{baseline['accuracy']:.2%} here, {baseline['baseline_accuracy']:.2%} there "
          f"({100 * baseline['difference']:+.2f} points); right here only "
          f"{baseline['right_only_here']}, there only {baseline['right_only_in_baseline']}, of "
          f"{baseline['num_examples']} faces; McNemar exact p = {baseline['p_value']:.3g}")


def format_metrics(metrics: dict, title: str = "") -> str:
  """A plain-text table of :func:`classification_metrics` output."""
  names = metrics["class_names"]
  width = max(len(n) for n in names + ["macro avg"]) + 2
  lines = [title] if title else []
  interval = ""
  if "accuracy_ci95" in metrics:  # Reports written before it was added have none.
    low, high = metrics["accuracy_ci95"]
    interval = f" (95% CI {100 * low:.2f}-{100 * high:.2f})"
  ece = f"  ECE {metrics['ece']:.4f}" if "ece" in metrics else ""
  lines.append(f"accuracy {metrics['accuracy']:.2%}{interval}  macro-F1 "
               f"{metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}{ece}  "
               f"examples {metrics['num_examples']}")
  lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
  for name in names:
    m = metrics["per_class"][name]
    lines.append(f"{name:<{width}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}"
                 f"{m['support']:>10d}")
  lines.append("confusion (rows: true, columns: predicted)")
  short = [n[:7] for n in names]
  lines.append(" " * width + "".join(f"{s:>8}" for s in short))
  for name, row in zip(names, metrics["confusion"]):
    lines.append(f"{name:<{width}}" + "".join(f"{v:>8d}" for v in row))
  return "\n".join(lines)


def make_predict_fn(model, tta: str = "none") -> Callable[[np.ndarray], jax.Array]:
  """A jitted ``uint8 faces → probabilities`` function of a model, in eval mode.

  The model's state is split out once and passed to ``jax.jit`` as data (the
  functional form: no per-call graph traversal). The predictions are the eval
  mode's (dropout off, BatchNorm on its running statistics) whatever mode
  ``model`` is in; ``model`` itself is left in its mode.
  """
  from flax import nnx

  if tta not in TTA_MODES:
    raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, images):
    copy = nnx.merge(graphdef, state)
    # A model still in train mode (as create_model returns it) would otherwise predict
    # with dropout and batch statistics, silently.
    copy.eval()
    return predict_probs(copy, images, tta)

  return lambda images: predict(state, images)


def model_metrics(model, split, class_names: Sequence[str], tta: str = "none", *,
                  batch_size: int = 256, progress: str | None = None) -> dict:
  """:func:`classification_metrics` of ``model`` (eval mode) on a labelled split."""
  _check_eval_args(tta, batch_size)
  probs = predict_dataset(make_predict_fn(model, tta), split.images, batch_size,
                          progress=progress)
  return classification_metrics(probs, split.labels, class_names)


def _log_start(workdir, meta, subset, split: str, tta: str) -> None:
  # The first line an evaluation prints: without it the entrypoint is silent until the
  # report (half a minute for PrivateTest with flip TTA on a CPU, minutes with ten-crop).
  log.info("evaluating %s (%s, step %s) on %d %s images, tta=%s", workdir, meta["model"],
           meta["step"], len(subset.images), split, tta)


def evaluate_checkpoint(workdir: str, *, checkpoint: str | int = "best", split: str | None = None,
                        tta: str = "none", data=None, data_path: str | None = None,
                        ferplus_path: str | None = None, batch_size: int = 256,
                        expect_model: str | None = None, output_dir: str | None = None,
                        on_error: str = "raise", baseline: str | os.PathLike | None = None,
                        mistakes: int = 0) -> dict:
  """Evaluates a run's checkpoint on a split; writes JSON and a confusion-matrix PNG.

  Args:
    workdir: the run's workdir (or its ``checkpoints/``).
    checkpoint: ``best``, ``latest`` or a step.
    split: split to report; default the run's test split (PrivateTest).
    tta: ``none``, ``flip`` or ``ten_crop``.
    data: a loaded :class:`ferjax.data.FerData` (else read from ``data_path``);
      the whole data set, or one holding the reported split only (e.g.
      ``data.split("PrivateTest")``).
    data_path: FER2013 in any supported form (default ``$FER2013_PATH``).
    ferplus_path: ``fer2013new.csv`` when the run used FER+ labels.
    batch_size: the fixed evaluation batch (the last one is padded and masked).
    expect_model: fail unless the checkpoint holds this model.
    output_dir: where to write results (default: the workdir).
    on_error: ``skip`` drops malformed data rows (with a warning) instead of
      failing, as training's ``--skip_bad_rows``.
    baseline: another run to compare with, :func:`paired_comparison`, in the
      metrics (and the report) as ``baseline``. Its best checkpoint, whatever
      ``checkpoint`` says, on the faces and TTA of this evaluation (the data
      and split come from this run's config, as an ensemble's from its first).
    mistakes: with N > 0, the N most confident wrong predictions
      (:func:`confident_mistakes`) are listed in the metrics as ``mistakes``,
      and the first ``MISTAKES_DRAWN`` drawn into ``<report>-mistakes.png``: position in the split, data row
      (``FerData.rows``: the 0-based data row of ``fer2013.csv``, where the FER+
      votes for the face can be looked up; for image folders, the position in
      the listing), label, prediction and its probability. For a FER2013 run
      with ``ferplus_path`` (or ``$FERPLUS_PATH``) and CSV data, each also gets
      ``ferplus``: the FER+ majority for its row, or None where FER+ has none.

  Returns:
    The metrics dict, with ``step``, ``split``, ``tta`` and ``model`` added
    (and ``baseline``: its workdir, model and step with the comparison).

  Raises:
    ConfigError: a bad ``tta`` or ``batch_size``, an ``output_dir`` that is
      or lies under a file, data whose label set is not the checkpoint's, or
      a baseline that predicts another label set.
    CheckpointError: no such checkpoint, or not of ``expect_model``.
    DataError: the data cannot be read, or has no such split.
  """
  from ferjax import checkpoint as checkpoint_lib

  _check_eval_args(tta, batch_size)
  if not is_whole(mistakes, 0):
    raise ConfigError(f"mistakes must be a whole number of at least 0, got {mistakes!r}")
  if output_dir is not None:
    check_folder_path(output_dir, "output_dir")
  model, meta = checkpoint_lib.load_model(workdir, checkpoint, expect_model=expect_model)
  if baseline is not None:  # Loaded before anything predicts: a bad baseline fails in seconds.
    base_model, base_meta = checkpoint_lib.load_model(baseline)
    if (base_meta["labels"], list(base_meta["class_names"])) != (meta["labels"],
                                                                list(meta["class_names"])):
      raise ConfigError(f"--baseline={baseline}: its model predicts {base_meta['labels']} "
                        f"classes {list(base_meta['class_names'])}, {workdir}'s predicts "
                        f"{meta['labels']} classes {list(meta['class_names'])}")
  ferplus_votes = None
  if mistakes and meta["labels"] == "fer2013":  # FER+ for the mistakes, not as labels.
    ferplus_votes = ferplus_path or os.environ.get("FERPLUS_PATH")
    ferplus_path = None
  subset, split = _test_subset(meta, split, data, data_path, ferplus_path, on_error)
  _log_start(workdir, meta, subset, split, tta)
  probs = predict_dataset(make_predict_fn(model, tta), subset.images, batch_size,
                          progress=f"{workdir} on {split} (tta={tta})")
  metrics = classification_metrics(probs, subset.labels, meta["class_names"])
  metrics.update(step=meta["step"], split=split, tta=tta, model=meta["model"],
                 labels=meta["labels"])
  if baseline is not None:
    _log_start(baseline, base_meta, subset, split, tta)
    base_probs = predict_dataset(make_predict_fn(base_model, tta), subset.images, batch_size,
                                 progress=f"{baseline} on {split} (tta={tta})")
    metrics["baseline"] = {"workdir": os.fspath(baseline), "model": base_meta["model"],
                           "step": base_meta["step"],
                           **paired_comparison(probs, base_probs, subset.labels)}
  if mistakes:
    metrics["mistakes"] = _list_mistakes(probs, subset, meta["class_names"], mistakes,
                                         ferplus_votes)
  if output_dir is None:
    output_dir = checkpoint_lib.run_folder(workdir)
  stem = f"eval-{split}-step{meta['step']}-tta_{tta}"
  _write_report(metrics, output_dir, stem, f"{meta['model']} {split} (step {meta['step']}, "
                f"tta={tta})")
  if mistakes:
    path = os.path.join(os.path.abspath(output_dir), stem + "-mistakes.png")
    _draw_mistakes(metrics["mistakes"], subset.images, path)
    metrics["files"].append(path)
  return metrics


def _list_mistakes(probs: np.ndarray, subset, class_names: Sequence[str], n: int,
                   ferplus_path: str | None) -> list[dict]:
  """The ``n`` most confident mistakes as report entries (FER+'s majority where given)."""
  names = list(class_names)
  found = [{"index": int(i), "row": int(subset.rows[i]), "label": names[subset.labels[i]],
            "predicted": names[probs[i].argmax()], "probability": float(probs[i].max())}
           for i in confident_mistakes(probs, subset.labels, n)]
  if ferplus_path and subset.csv_rows:
    _add_ferplus_majority(found, subset, ferplus_path)
  return found


def _draw_mistakes(found: list[dict], images: np.ndarray, path: str) -> None:
  """The first ``MISTAKES_DRAWN`` entries as a captioned face grid (a larger one outgrows a PNG)."""
  from ferjax import plots

  found = found[:MISTAKES_DRAWN]
  plots.plot_face_grid(images[[m["index"] for m in found]],
                       [f"row {m['row']}: {m['label'][:7]}\n→ {m['predicted'][:7]} "
                        f"{m['probability']:.2f}"
                        + (f"\nFER+ {(m['ferplus'] or '-')[:7]}" if "ferplus" in m else "")
                        for m in found], path)


def evaluate_ensemble(workdirs: Sequence[str], *, output_dir: str, checkpoint: str | int = "best",
                      split: str | None = None, tta: str = "none", data=None,
                      data_path: str | None = None, ferplus_path: str | None = None,
                      batch_size: int = 256, expect_model: str | None = None,
                      on_error: str = "raise") -> dict:
  """Evaluates the average of several runs' predicted probabilities (an ensemble).

  Every member is weighted equally (nothing is tuned on the reported split).
  The runs must share a label set; the data and the default split come from
  the first run's config. Writes JSON and a confusion-matrix PNG into
  ``output_dir`` (never into a member's workdir).

  Args:
    workdirs: the members' workdirs (or their ``checkpoints/``), at least two.
    output_dir: where to write results; not one of ``workdirs``, nor a folder
      holding another ensemble's report for the same split and TTA.
    split: split to report; default the first run's test split.
    expect_model: fail unless every checkpoint holds this model.
    checkpoint, tta, data, data_path, ferplus_path, batch_size, on_error: as in
      :func:`evaluate_checkpoint`, for every member.

  Returns:
    The ensemble's metrics dict, with ``members`` (each run's workdir, model,
    step and own metrics on the same split and TTA), ``split``, ``tta`` and
    ``model`` added.

  Raises:
    ConfigError: fewer than two runs, members with other label sets, or an
      ``output_dir`` that is a member's workdir or another ensemble's, or is or
      lies under a file.
    CheckpointError, DataError: as in :func:`evaluate_checkpoint`.
  """
  from ferjax import checkpoint as checkpoint_lib

  if len(workdirs) < 2:
    raise ConfigError(f"an ensemble needs at least two runs, got {list(workdirs)}")
  _check_eval_args(tta, batch_size)
  check_folder_path(output_dir, "output_dir")
  for workdir in workdirs:
    if os.path.exists(output_dir) and os.path.exists(workdir) and \
        os.path.samefile(output_dir, workdir):
      raise ConfigError(f"--output_dir={output_dir} is the workdir of member {workdir}; an "
                        "ensemble's results go to a folder of their own")
  # Every member loads before any predicts: a missing run, step or label set named last
  # fails in seconds, not after the others' predictions (minutes with ten-crop on a CPU).
  loaded = []
  for workdir in workdirs:
    model, meta = checkpoint_lib.load_model(workdir, checkpoint, expect_model=expect_model)
    if not loaded:
      first = meta
    elif (meta["labels"], list(meta["class_names"])) != (first["labels"],
                                                        list(first["class_names"])):
      raise ConfigError(f"{workdir}: its model predicts {meta['labels']} classes "
                       f"{list(meta['class_names'])}, {workdirs[0]}'s predicts "
                       f"{first['labels']} classes {list(first['class_names'])}")
    loaded.append((workdir, model, meta))
  subset, split = _test_subset(first, split, data, data_path, ferplus_path, on_error)
  _refuse_other_ensemble(os.path.join(output_dir, f"eval-ensemble-{split}-tta_{tta}.json"),
                         workdirs)
  members, probs = [], []
  for workdir, model, meta in loaded:
    _log_start(workdir, meta, subset, split, tta)
    p = predict_dataset(make_predict_fn(model, tta), subset.images, batch_size,
                        progress=f"{workdir} on {split} (tta={tta})")
    own = classification_metrics(p, subset.labels, meta["class_names"])
    members.append({"workdir": workdir, "model": meta["model"], "step": meta["step"],
                    "accuracy": own["accuracy"], "macro_f1": own["macro_f1"]})
    probs.append(p)
  metrics = classification_metrics(np.mean(probs, axis=0), subset.labels, first["class_names"])
  name = "+".join(m["model"] for m in members)
  metrics.update(members=members, split=split, tta=tta, model=f"ensemble({name})",
                 labels=first["labels"])
  _write_report(metrics, output_dir, f"eval-ensemble-{split}-tta_{tta}",
                f"ensemble of {len(members)} ({name}) {split} (tta={tta})")
  return metrics


def _add_ferplus_majority(found: list[dict], subset, ferplus_path: str) -> None:
  """Adds ``ferplus`` to each mistake: FER+'s majority label for its row, or None."""
  from ferjax.data import load_ferplus, with_ferplus_labels

  # The join checks that the two files are row-aligned (their Usage columns agree).
  picked = with_ferplus_labels(subset.select(np.array([m["index"] for m in found], np.int64)),
                               load_ferplus(ferplus_path))
  majority = {int(row): picked.class_names[label]
              for row, label in zip(picked.rows, picked.labels)}
  for m in found:
    m["ferplus"] = majority.get(m["row"])


def _check_eval_args(tta: str, batch_size: int) -> None:
  """Checked before the model and the data load (seconds) rather than after."""
  if tta not in TTA_MODES:
    raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
  if not is_whole(batch_size, 1):
    raise ConfigError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")


def _refuse_other_ensemble(report: str, workdirs: Sequence[str]) -> None:
  """An ensemble's report may replace one of the same members only (re-evaluated)."""
  if not os.path.exists(report):
    return
  try:
    with open(report) as f:
      theirs = [m["workdir"] for m in json.load(f)["members"]]
  except (OSError, ValueError, KeyError, TypeError):
    theirs = None
  same = theirs is not None and sorted(map(os.path.abspath, theirs)) == sorted(
      map(os.path.abspath, workdirs))
  if not same:
    raise ConfigError(f"--output_dir={os.path.dirname(report)} already holds "
                      f"{os.path.basename(report)} for another ensemble"
                      + (f" ({', '.join(theirs)})" if theirs else "")
                      + "; give this one its own --output_dir")


def _test_subset(meta: dict, split: str | None, data, data_path, ferplus_path, on_error="raise"):
  """The split a checkpoint is evaluated on, loaded as its config says: ``(subset, split)``."""
  from ferjax.config import TrainConfig
  from ferjax.data import FerData

  config = TrainConfig.from_dict(meta["config"])
  if data is None:
    data = load_run_data(config, data_path, ferplus_path=ferplus_path, on_error=on_error)
  elif not isinstance(data, FerData):
    raise TypeError(f"data must be a FerData (from ferjax.data.load_fer2013), got "
                    f"{type(data).__name__}; pass a file as data_path")
  elif tuple(data.class_names) != tuple(meta["class_names"]):
    # Labels of another set would index past the model's classes (an IndexError in the
    # metrics) or be scored against the wrong names.
    raise ConfigError(f"the checkpoint predicts {meta['labels']} classes "
                      f"{list(meta['class_names'])}, the data has {list(data.class_names)}; "
                      "pass data with the checkpoint's labels (ferjax.data.with_ferplus_labels "
                      "for FER+)")
  try:
    config, data = resolve_splits(config, data)
  except ConfigError:
    pass  # Data without the run's training splits (data.split("PrivateTest")): not needed here.
  if split is None and config.test_split not in data.split_names:
    # The run's own test split is missing: data of another kind than it was trained on
    # (a FER2013 CSV for a run on image folders, or the reverse).
    raise DataError(f"the run reports on its split {config.test_split!r}, which this data "
                    f"does not have (it has {', '.join(data.split_names)}): pass the data the "
                    "run was trained on, or name a split of this data with --split",
                    path=data.source)
  split = split or config.test_split
  return data.split(split), split


def _write_report(metrics: dict, output_dir: str, stem: str, title: str) -> None:
  """Writes ``stem.json`` and ``stem-confusion.png``; lists them in ``metrics["files"]``."""
  from ferjax import plots

  out = os.path.abspath(output_dir)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, stem)
  with open(path + ".json", "w") as f:
    json.dump(metrics, f, indent=2)
  plots.plot_confusion(metrics["confusion"], metrics["class_names"], path + "-confusion.png",
                       title=f"{title}: {metrics['accuracy']:.2%}")
  metrics["files"] = [path + ".json", path + "-confusion.png"]
