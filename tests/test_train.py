"""Training and evaluation end to end on tiny real-format data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fer_rows, write_csv
from ferjax import checkpoint as checkpoint_lib
from ferjax import distill as distill_lib
from ferjax import train as train_lib
from ferjax.augment import NO_AUGMENT
from ferjax.config import TrainConfig, default_config
from ferjax.data import load_fer2013
from ferjax.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from ferjax.evaluate import (classification_metrics, confident_mistakes, evaluate_checkpoint,
                             evaluate_ensemble, expected_calibration_error, format_metrics,
                             make_predict_fn, mcnemar_exact_p, paired_comparison,
                             predict_dataset, wilson_interval)
from ferjax.preprocess import preprocess
from ferjax.splits import resolve_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ALSTM = dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
  """64 Training, 20 PublicTest, 21 PrivateTest rows (ragged against batch 16)."""
  rows = fer_rows(64, usages=("Training",)) + fer_rows(20, usages=("PublicTest",)) + \
      fer_rows(21, usages=("PrivateTest",))
  return write_csv(tmp_path_factory.mktemp("data") / "fer2013.csv", rows)


@pytest.fixture(scope="module")
def tiny_data(tiny_csv):
  return load_fer2013(tiny_csv, cache=False)


def tiny_config(**changes):
  base = dict(model="acnn_alstm", model_overrides=TINY_ALSTM, epochs=2, batch_size=16,
              eval_batch_size=16, learning_rate=3e-3)
  return TrainConfig(**{**base, **changes})


def _params(workdir, which="latest"):
  model, meta = checkpoint_lib.load_model(workdir, which)
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), meta


def test_end_to_end_train_checkpoint_evaluate(tmp_path, tiny_csv, tiny_data, caplog,
                                              monkeypatch):
  workdir = str(tmp_path / "run")
  trainers = []
  init = train_lib.Trainer.__init__
  monkeypatch.setattr(train_lib.Trainer, "__init__",
                      lambda self, *a, **k: (trainers.append(self), init(self, *a, **k))[1])
  results = train_lib.train_and_evaluate(tiny_config(), workdir, data_path=tiny_csv)
  # Fixed shapes: one compiled training step for all 8 steps (epochs, a partial last batch
  # of the data dropped), one prediction program per TTA mode for the two PublicTest
  # evaluations (20 faces: a padded last batch) and the three PrivateTest ones (21).
  (trainer,) = trainers
  assert trainer._train_step_jit._cache_size() == 1
  assert trainer._predict._cache_size() == 3
  for name in ("config.json", "metrics.jsonl", "curves.png", "results.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [4, 8]  # Once per epoch of 64 // 16 steps.
  assert results["test_tta_none"]["num_examples"] == 21
  assert results["best_step"] in (4, 8)

  with caplog.at_level(logging.INFO, logger="ferjax.evaluate"):
    metrics = evaluate_checkpoint(workdir, checkpoint="best", tta="flip", data=tiny_data,
                                  batch_size=16)
  # A first line before the predictions, so an entrypoint is not silent until the report.
  assert [r.getMessage() for r in caplog.records if r.name == "ferjax.evaluate"][0] == (
      f"evaluating {workdir} (acnn_alstm, step {results['best_step']}) on 21 PrivateTest "
      "images, tta=flip")
  assert metrics["num_examples"] == 21 and metrics["split"] == "PrivateTest"
  assert metrics["step"] == results["best_step"]
  assert metrics["accuracy"] == pytest.approx(results["test_tta_flip"]["accuracy"])
  assert all(os.path.exists(f) for f in metrics["files"])
  # The checkpoint alone rebuilds the model: no flags needed.
  model, meta = checkpoint_lib.load_model(workdir, "best")
  assert meta["model"] == "acnn_alstm" and meta["labels"] == "fer2013"
  assert meta["class_names"][1] == "disgust" and meta["ferjax_version"]


def test_evaluation_is_exact_with_a_ragged_last_batch(tiny_data):
  model = train_lib.build_model(tiny_config(), 7)
  model.eval()
  test = tiny_data.split("PrivateTest")
  traces = []

  def model_fn(x):
    traces.append(x.shape)
    return model(x)

  graphdef, state = nnx.split(model)
  predict = jax.jit(lambda s, x: jax.nn.softmax(nnx.merge(graphdef, s)(
      (x.astype(jnp.float32) / 255 - 0.5077) / 0.255)))
  from ferjax.evaluate import predict_probs
  counted = jax.jit(lambda x: predict_probs(model_fn, x))
  probs = predict_dataset(counted, test.images, batch_size=16)
  assert probs.shape == (21, 7) and len(traces) == 1  # One compile for full and padded batches.
  whole = np.asarray(predict(state, test.images))
  np.testing.assert_allclose(probs, whole, rtol=1e-4, atol=1e-6)
  m = classification_metrics(probs, test.labels, tiny_data.class_names)
  assert m["num_examples"] == 21
  assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == test.labels))
  assert sum(map(sum, m["confusion"])) == 21


def test_make_predict_fn_predicts_in_eval_mode_and_leaves_the_models_mode(tiny_data):
  model = train_lib.build_model(tiny_config(), 7)  # In train mode, as create_model returns it.
  faces = tiny_data.images[:4]
  in_train_mode = np.asarray(make_predict_fn(model)(faces))
  assert not model.dropout.deterministic  # Left in train mode.
  model.eval()
  # Before: the train-mode model predicted with dropout and batch statistics, silently.
  np.testing.assert_allclose(in_train_mode, np.asarray(make_predict_fn(model)(faces)),
                             rtol=1e-5, atol=1e-6)


def test_predict_dataset_logs_progress_when_labelled(tiny_data, caplog):
  images = tiny_data.split("PrivateTest").images  # 21 faces: batches of 8, 8 and 5.
  uniform = jax.jit(lambda x: jnp.full((x.shape[0], 7), 1 / 7))
  with caplog.at_level(logging.INFO, logger="ferjax.evaluate"):
    probs = predict_dataset(uniform, images, 8)
    assert probs.shape == (21, 7) and not caplog.records  # No label, no progress lines.
    predict_dataset(uniform, images, 8, progress="teacher", log_every_s=0)
  lines = [r.getMessage() for r in caplog.records]
  assert [line.split(",")[0] for line in lines] == ["teacher: 8/21 images", "teacher: 16/21 images"]
  assert all(line.endswith("images/s") for line in lines)


def test_predict_dataset_logs_progress_as_the_work_is_done(tiny_data, caplog):
  """A line while the batches run, not once they are all done: dispatching every batch
  first let the runtime's full queue block the loop, and a teacher on the 28,709 training
  faces printed its first line after 7.5 minutes, at 22,272 faces, with the rate 699
  images/s against 48 (2026-11-28)."""
  images = tiny_data.split("PrivateTest").images  # 21 faces: five batches of 4, then 1.

  def blocking(x):  # Works at dispatch, as a runtime whose queue is full.
    time.sleep(0.05)
    return np.full((x.shape[0], 7), 1 / 7, np.float32)

  with caplog.at_level(logging.INFO, logger="ferjax.evaluate"):
    probs = predict_dataset(blocking, images, 4, progress="teacher", log_every_s=0.04,
                            in_flight=1)
  assert probs.shape == (21, 7)
  lines = [r.getMessage() for r in caplog.records]
  assert [line.split(",")[0] for line in lines] == [f"teacher: {n}/21 images"
                                                    for n in (4, 8, 12, 16, 20)]
  rates = [float(line.split(", ")[1].split()[0]) for line in lines]
  assert all(0 < r <= 4 / 0.05 for r in rates)  # At most one batch of 4 per 50 ms.


def test_metrics_by_hand():
  probs = np.eye(3)[[0, 1, 1, 2, 2, 2]] * 0.9 + 0.1 / 3
  labels = np.array([0, 1, 2, 2, 2, 0])
  m = classification_metrics(probs, labels, ["a", "b", "c"])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["confusion"] == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
  assert m["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
  assert m["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
  assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 2 / 3, 2 / 3]))
  # The loss is the NLL of the true class: 0.9 + 0.1/3 for the 4 right, 0.1/3 for the 2 wrong.
  assert m["loss"] == pytest.approx(-(4 * np.log(0.9 + 0.1 / 3) + 2 * np.log(0.1 / 3)) / 6)
  # Above, macro-F1 equals the accuracy; here it does not. Class d is predicted once but
  # never true: its F1 (0) is left out of the macro average, which is over a, b and c.
  labels = np.array([0, 0, 0, 1, 2, 2])
  m = classification_metrics(np.eye(4)[[0, 0, 3, 1, 1, 2]], labels, ["a", "b", "c", "d"])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["per_class"]["a"]["f1"] == pytest.approx(0.8)  # Precision 1, recall 2/3.
  assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
  assert m["per_class"]["d"]["support"] == 0 and m["per_class"]["d"]["f1"] == 0
  assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)


def test_accuracy_interval_is_the_wilson_score_interval():
  np.testing.assert_allclose(wilson_interval(50, 100), [0.40383, 0.59617], atol=1e-5)
  # At 0 or n successes it stays inside [0, 1]: the upper end of 0/n is z²/(n + z²).
  np.testing.assert_allclose(wilson_interval(0, 10), [0.0, 1.959964**2 / (10 + 1.959964**2)])
  np.testing.assert_allclose(wilson_interval(10, 10), [10 / (10 + 1.959964**2), 1.0])
  assert wilson_interval(0, 0) == [0.0, 1.0]
  with pytest.raises(ValueError, match="successes must be in 0..n, got successes=3, n=2"):
    wilson_interval(3, 2)  # Before: math domain error.
  # FER2013's PrivateTest at 70 %: about ±1.5 points from the choice of faces alone.
  low, high = wilson_interval(2512, 3589)
  assert low < 2512 / 3589 < high and 100 * (high - low) / 2 == pytest.approx(1.5, abs=0.05)


def test_expected_calibration_error_by_hand():
  # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.7 (right): three bins of 15.
  # |1 - 1.8| + |1 - 0.6| + |1 - 0.7| over 4 examples.
  probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
  assert expected_calibration_error(probs, np.array([0, 1, 0, 1])) == pytest.approx(1.5 / 4)
  # Five faces at confidence 0.8 of which four are right: calibrated, whatever the classes.
  probs = np.array([[0.8, 0.2], [0.2, 0.8], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]])
  assert expected_calibration_error(probs, np.array([0, 1, 0, 1, 1])) == pytest.approx(0)
  assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)) == 0.0
  # float32 probabilities on a bin edge (0.8 is 0.800000011... in float32) stay in their bin.
  probs = np.array([[0.8, 0.2], [0.2, 0.8], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]], np.float32)
  assert expected_calibration_error(probs, np.array([0, 1, 0, 1, 1])) == pytest.approx(0, abs=1e-6)


def test_metrics_report_the_interval_and_calibration():
  probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
  m = classification_metrics(probs, np.array([0, 1, 0, 1]), ["a", "b"])
  assert m["accuracy_ci95"] == pytest.approx(wilson_interval(3, 4))
  assert m["ece"] == pytest.approx(1.5 / 4)
  json.dumps(m)  # Written into the reports as it is.
  low, high = m["accuracy_ci95"]
  assert (f"accuracy 75.00% (95% CI {100 * low:.2f}-{100 * high:.2f})  macro-F1 "
          in format_metrics(m))
  assert "ECE 0.3750  examples 4" in format_metrics(m)
  # A report written before the two were added still prints.
  old = {k: v for k, v in m.items() if k not in ("accuracy_ci95", "ece")}
  assert format_metrics(old).splitlines()[0].startswith("accuracy 75.00%  macro-F1 ")


def test_mcnemar_exact_p_by_hand():
  assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # All five discordant pairs one way.
  assert mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 1024)  # 2·(C(10,0) + C(10,1))/2^10.
  assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
  with pytest.raises(ValueError, match="counts must be at least 0, got -1 and 3"):
    mcnemar_exact_p(-1, 3)  # Before: 0.0, silently.
  # Thousands of pairs, beyond what floating-point powers of two could hold.
  assert 0 < mcnemar_exact_p(1100, 1000) < 0.04 < mcnemar_exact_p(1050, 1000) < 1


def test_confident_mistakes_are_the_wrong_answers_most_confident_first():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05], [0.7, 0.3]])
  labels = np.array([1, 1, 1, 0, 0, 1])  # Wrong: 0 (0.9), 2 (0.6), 3 (0.7), 5 (0.7).
  assert confident_mistakes(probs, labels, 10).tolist() == [0, 3, 5, 2]  # Ties keep order.
  assert confident_mistakes(probs, labels, 2).tolist() == [0, 3]
  assert confident_mistakes(probs, labels, 0).tolist() == []


def test_paired_comparison_counts_the_faces_only_one_model_gets_right():
  labels = np.array([0, 1, 2, 0, 1, 2])
  here = np.eye(3)[[0, 1, 2, 0, 0, 0]]  # Right on faces 0-3.
  there = np.eye(3)[[0, 2, 1, 0, 1, 0]]  # Right on faces 0, 3 and 4.
  c = paired_comparison(here, there, labels)
  assert (c["right_only_here"], c["right_only_in_baseline"], c["num_examples"]) == (2, 1, 6)
  assert c["accuracy"] == pytest.approx(4 / 6) and c["baseline_accuracy"] == pytest.approx(3 / 6)
  assert c["difference"] == pytest.approx(1 / 6)
  assert c["p_value"] == pytest.approx(mcnemar_exact_p(2, 1)) == 1.0
  with pytest.raises(ConfigError, match=r"got \(6, 3\) and \(5, 3\) for \(6,\) labels"):
    paired_comparison(here, there[:5], labels)


@pytest.mark.parametrize("probs, labels, message", [
    # Before: IndexErrors from numpy that named neither argument.
    (np.full((4, 7), 1 / 7), [0, 1, 2, 3],
     r"probs must be \(N, 3\), one column per class name, got shape \(4, 7\)"),
    (np.full((4, 3), 1 / 3), [0, 1, 2],
     r"labels must be 4 class indices \(N,\) in 0..2, one per row of probs, got int64 \(3,\)"),
    (np.full((4, 3), 1 / 3), [0, 1, 2, 9], r"got int64 \(4,\) with values 0..9"),
    (np.full((4, 3), 1 / 3), np.eye(3)[[0, 1, 2, 0]], r"got float64 \(4, 3\)"),
    (np.full((2, 3), 1 / 3), [0.0, 1.0], r"got float64 \(2,\) with values 0.0..1.0"),
])
def test_metrics_name_mismatched_arguments(probs, labels, message):
  with pytest.raises(ConfigError, match=message):
    classification_metrics(probs, np.asarray(labels), ["a", "b", "c"])
  # Lists are taken as arrays (before: AttributeError, 'list' object has no attribute 'argmax').
  assert classification_metrics([[0.9, 0.1, 0.0]], [0], ["a", "b", "c"])["accuracy"] == 1.0


def test_model_metrics_refuses_a_batch_size_below_one(tiny_data):
  from ferjax.evaluate import model_metrics
  from ferjax.models import create_model
  model = create_model("dnn", num_classes=7, rngs=nnx.Rngs(0), width=4, fc_sizes=(8, 8))
  # Before: ValueError: range() arg 3 must not be zero.
  with pytest.raises(ConfigError, match="batch_size must be a whole number of at least 1, got 0"):
    model_metrics(model, tiny_data.split("PrivateTest"), tiny_data.class_names, batch_size=0)


def test_loss_falls_when_overfitting_one_batch(tiny_data):
  config = tiny_config(augment=NO_AUGMENT, label_smoothing=0.0, learning_rate=1e-2,
                       model_overrides={**TINY_ALSTM, "dropout": 0.0})
  from ferjax import parallel
  mesh = parallel.make_mesh()
  trainer = train_lib.Trainer(config, 7, mesh, total_steps=60, steps_per_epoch=60,
                              weights=np.ones(7, np.float32))
  train = tiny_data.split("Training")
  batch = parallel.shard_batch({"image": train.images[:16], "label": train.labels[:16]}, mesh)
  losses = []
  for step in range(60):
    trainer.state, m = trainer.train_step(trainer.state, trainer.zero_metrics(), batch,
                                          jnp.asarray(step))
    losses.append(float(m["loss"]) / 16)
  assert losses[-1] < 0.3 * losses[0]


def test_the_step_learns_soft_targets_when_the_batch_has_them(tiny_data):
  """Soft targets (FER+ votes, distillation) replace the labels in the loss."""
  from ferjax import parallel
  config = tiny_config(augment=NO_AUGMENT, label_smoothing=0.0, learning_rate=1e-2,
                       model_overrides={**TINY_ALSTM, "dropout": 0.0})
  mesh = parallel.make_mesh()
  train = tiny_data.split("Training")
  images, labels = train.images[:16], train.labels[:16]
  shifted = (labels + 1) % 7  # Targets that disagree with every label.
  predicted = {}
  for name, extra in (("labels", {}), ("soft", {"soft_label": np.eye(7, dtype=np.float32)[
      shifted]})):
    trainer = train_lib.Trainer(config, 7, mesh, total_steps=60, steps_per_epoch=60,
                                weights=np.ones(7, np.float32))
    batch = parallel.shard_batch({"image": images, "label": labels, **extra}, mesh)
    for step in range(60):
      trainer.state, _ = trainer.train_step(trainer.state, trainer.zero_metrics(), batch,
                                            jnp.asarray(step))
    predicted[name] = np.asarray(trainer.predict(jnp.asarray(images))).argmax(1)
  # Seen 2026-11-26: labels 0.875 / shifted 0.0 without, 0.0 / 0.625 with soft targets.
  assert (predicted["labels"] == labels).mean() >= 0.6 > (predicted["labels"] == shifted).mean()
  assert (predicted["soft"] == shifted).mean() >= 0.5 > (predicted["soft"] == labels).mean()


def test_mixing_in_the_step_softens_what_the_model_learns(tiny_data):
  """Mixup and CutMix reach the loss: trained on blends, the model is less sure of each face."""
  from ferjax import parallel
  mesh = parallel.make_mesh()
  train = tiny_data.split("Training")
  batch = parallel.shard_batch({"image": train.images[:16], "label": train.labels[:16]}, mesh)
  base = tiny_config(augment=NO_AUGMENT, label_smoothing=0.0, learning_rate=1e-2,
                     model_overrides={**TINY_ALSTM, "dropout": 0.0})
  confidence, params = {}, {}
  for name, mixing in (("none", {}), ("off", dict(mixup_alpha=1.0, mix_prob=0.0)),
                       ("mixup", dict(mixup_alpha=1.0)), ("cutmix", dict(cutmix_alpha=1.0))):
    config = dataclasses.replace(base, augment=dataclasses.replace(NO_AUGMENT, **mixing))
    trainer = train_lib.Trainer(config, 7, mesh, total_steps=60, steps_per_epoch=60,
                                weights=np.ones(7, np.float32))
    for step in range(60):
      trainer.state, _ = trainer.train_step(trainer.state, trainer.zero_metrics(), batch,
                                            jnp.asarray(step))
    probs = np.asarray(trainer.predict(jnp.asarray(train.images[:16])))
    confidence[name] = probs.max(1).mean()
    params[name] = jax.tree.map(np.asarray, trainer.state["model"])
  # mix_prob=0 is no mixing at all, down to the bit.
  jax.tree.map(np.testing.assert_array_equal, params["none"], params["off"])
  # Seen 2026-11-27: mean top probability 0.62 without mixing, 0.49 mixup, 0.46 CutMix.
  assert confidence["mixup"] < confidence["none"] - 0.08
  assert confidence["cutmix"] < confidence["none"] - 0.08


def test_the_step_erases_and_mixes_faces_with_independent_draws(tiny_data, monkeypatch):
  """Which faces are erased and which are mixed are separate coin flips, not one."""
  from ferjax import augment as aug_lib
  from ferjax import parallel

  class Stop(Exception):
    pass

  seen = {}

  def spy_augment(key, x, config):
    out = aug_lib.augment(key, x, config)
    seen["erased"] = np.asarray((out == 0).any(axis=(1, 2, 3)))
    return out

  def spy_mix(key, x, targets, weights, config):
    out = aug_lib.mix_batch(key, x, targets, weights, config)[0]
    seen["mixed"] = np.asarray((out != x).any(axis=(1, 2, 3)))
    raise Stop  # The model is not needed.

  monkeypatch.setattr(train_lib, "augment", spy_augment)
  monkeypatch.setattr(train_lib, "mix_batch", spy_mix)
  config = tiny_config(batch_size=64, augment=dataclasses.replace(
      NO_AUGMENT, erase_prob=0.5, mixup_alpha=1.0, mix_prob=0.5))
  mesh = parallel.make_mesh()
  trainer = train_lib.Trainer(config, 7, mesh, total_steps=1, steps_per_epoch=1,
                              weights=np.ones(7, np.float32))
  # Every pixel 200: non-zero after preprocess, so an erased face shows zeros.
  batch = {"image": np.full((64, 48, 48, 1), 200, np.uint8),
           "label": np.arange(64, dtype=np.int32) % 7}
  for step in range(2):
    with pytest.raises(Stop):  # Unjitted: the spies see concrete values.
      trainer._train_step(trainer.rng_state, trainer.state, trainer.zero_metrics(), batch,
                          jnp.asarray(step))
    erased, mixed = seen["erased"], seen["mixed"]
    assert 16 < erased.sum() < 48 and 16 < mixed.sum() < 48
    # With one key for both, the same faces came out erased and mixed (all 64 agreed).
    assert (erased != mixed).sum() > 10


def test_the_train_step_traces_without_deprecation_warnings(tiny_data):
  """What JAX, Flax and Optax deprecate now fails in their next versions."""
  import warnings

  from ferjax import parallel
  mesh = parallel.make_mesh()
  trainer = train_lib.Trainer(tiny_config(ema_decay=0.5), 7, mesh, total_steps=1,
                              steps_per_epoch=1, weights=np.ones(7, np.float32))
  train = tiny_data.split("Training")
  batch = parallel.shard_batch({"image": train.images[:16], "label": train.labels[:16]}, mesh)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)  # Before: optax.global_norm.
    jax.eval_shape(trainer._train_step, trainer.rng_state, trainer.state, trainer.zero_metrics(),
                   batch, jnp.asarray(0))


def test_the_step_weighs_mixed_faces_by_the_weights_mixing_gives_them(tiny_data, monkeypatch):
  """A mixed face's loss weight is the mix of its two classes' weights, not its own class's."""
  from ferjax import parallel
  config = tiny_config(augment=dataclasses.replace(NO_AUGMENT, mixup_alpha=1.0),
                       label_smoothing=0.0, model_overrides={**TINY_ALSTM, "dropout": 0.0})
  train = tiny_data.split("Training")
  images, labels = train.images[:16], train.labels[:16]
  example_weights = np.zeros(16, np.float32)
  example_weights[:2] = 1.0  # Only the first two faces count.
  # Mixing that changes nothing but the weights, so the loss can be computed here.
  monkeypatch.setattr(train_lib, "mix_batch",
                      lambda key, x, targets, weights, config: (x, targets,
                                                                jnp.asarray(example_weights)))
  mesh = parallel.make_mesh()
  trainer = train_lib.Trainer(config, 7, mesh, total_steps=1, steps_per_epoch=1,
                              weights=np.ones(7, np.float32))
  batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
  _, metrics = trainer.train_step(trainer.state, trainer.zero_metrics(), batch, jnp.asarray(0))
  # The step's model (same seed, train mode), jitted only because eager is slow.
  logits = nnx.jit(lambda m, x: m(preprocess(x)))(train_lib.build_model(config, 7), images)
  one_hot = jax.nn.one_hot(labels, 7)
  expected = train_lib.loss_fn(logits, labels, jnp.ones(7), 0.0, one_hot,
                               example_weights_B=jnp.asarray(example_weights))
  unweighted = train_lib.loss_fn(logits, labels, jnp.ones(7), 0.0, one_hot)
  assert float(metrics["loss"]) / 16 == pytest.approx(float(expected), rel=1e-4)
  assert float(expected) != pytest.approx(float(unweighted), rel=1e-2)


def test_a_resumed_run_keeps_its_best_accuracy_and_reports_its_best_checkpoint(tmp_path, tiny_data,
                                                                               monkeypatch):
  accuracies = iter([0.5, 0.2, 0.1])  # Steps 1, 2 and 3: the first is the best.
  real_evaluate_step = train_lib._evaluate_step
  monkeypatch.setattr(train_lib, "_evaluate_step", lambda *args: {
      **real_evaluate_step(*args), "eval_accuracy": next(accuracies)})
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=2, eval_every=1), workdir, data=tiny_data)
  results = train_lib.train_and_evaluate(tiny_config(max_steps=3, eval_every=1), workdir,
                                         data=tiny_data)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3]
  # The resumed session starts from the best accuracy saved before it, not from scratch.
  assert [r["best_eval_accuracy"] for r in records] == [0.5, 0.5, 0.5]
  assert results["best_step"] == 1 and results["best_eval_accuracy"] == 0.5
  # The test split is reported with the best checkpoint's parameters, not the latest's.
  out = str(tmp_path / "eval")
  best = evaluate_checkpoint(workdir, checkpoint="best", data=tiny_data, batch_size=16,
                             output_dir=out)
  latest = evaluate_checkpoint(workdir, checkpoint="latest", data=tiny_data, batch_size=16,
                               output_dir=out)
  assert (best["step"], latest["step"]) == (1, 3)
  assert results["test_tta_none"]["loss"] == pytest.approx(best["loss"], rel=1e-5)
  assert latest["loss"] != pytest.approx(best["loss"], rel=1e-5)


def test_a_run_stopped_while_saving_an_evaluations_checkpoint_records_it_once(tmp_path, tiny_data,
                                                                            monkeypatch):
  real_save = checkpoint_lib.CheckpointStore.save

  def save_then_stop_at_4(self, step, **kw):
    if step == 4:  # After the record of step 4 is written, before its checkpoint is.
      raise KeyboardInterrupt
    real_save(self, step, **kw)

  workdir = str(tmp_path / "run")
  monkeypatch.setattr(checkpoint_lib.CheckpointStore, "save", save_then_stop_at_4)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(tiny_config(max_steps=6, eval_every=2), workdir, data=tiny_data)
  monkeypatch.setattr(checkpoint_lib.CheckpointStore, "save", real_save)
  train_lib.train_and_evaluate(tiny_config(max_steps=6, eval_every=2), workdir, data=tiny_data)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [2, 4, 6]  # Before: 2, 4, 4, 6.


def test_workdir_with_another_run_is_refused_and_fresh_moves_it_aside(tmp_path, tiny_data):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)
  with pytest.raises(ConfigError, match="learning_rate: saved 0.003, now 0.001"):
    train_lib.train_and_evaluate(tiny_config(max_steps=2, learning_rate=1e-3), workdir,
                                 data=tiny_data)
  assert os.path.exists(os.path.join(workdir, "checkpoints"))  # Untouched.
  train_lib.train_and_evaluate(tiny_config(max_steps=2, learning_rate=1e-3), workdir,
                               data=tiny_data, fresh=True)
  aside = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
  assert len(aside) == 1
  assert os.path.exists(os.path.join(tmp_path, aside[0], "checkpoints"))


def test_a_run_is_not_resumed_on_other_data(tmp_path, tiny_data):
  workdir = str(tmp_path / "run")
  config = tiny_config(max_steps=2)
  train_lib.train_and_evaluate(config, workdir, data=tiny_data)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  records = open(os.path.join(workdir, "metrics.jsonl")).read()
  # The same faces with one Training label changed: the same config, other data.
  labels = tiny_data.labels.copy()
  labels[0] = (labels[0] + 1) % 7
  other = dataclasses.replace(tiny_data, labels=labels)
  with pytest.raises(ConfigError, match="trained on other data: the images or labels of "
                     "Training differ"):
    train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=4), workdir, data=other)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # Untouched.
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == records
  # The same data resumes.
  train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=4), workdir, data=tiny_data)
  assert train_lib.checkpoint_lib.CheckpointStore(
      os.path.join(workdir, "checkpoints")).latest_step() == 4


def test_a_workdir_that_is_a_file_or_holds_a_broken_config_is_refused(tmp_path, tiny_data):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
    train_lib.train_and_evaluate(tiny_config(max_steps=1), str(a_file), data=tiny_data)
  assert a_file.read_text() == "mine"
  for text, why in (("{bad", "Expecting property name"), ('{"a": 1}', "no 'config' entry")):
    workdir = tmp_path / f"broken{len(text)}"
    workdir.mkdir()
    (workdir / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"config.json: not a ferjax run's config .{why}"):
      train_lib.train_and_evaluate(tiny_config(max_steps=1), str(workdir), data=tiny_data)
    assert os.listdir(workdir) == ["config.json"]
    assert (workdir / "config.json").read_text() == text


def _nan_loss(real_loss):
  return lambda *a, **k: real_loss(*a, **k) * jnp.nan


def _nan_gradients(real_loss):
  # The loss stays finite (sqrt(0) = 0); its gradient is 0 * inf = nan.
  return lambda logits, *a, **k: (real_loss(logits, *a, **k)
                                  + 0.0 * jnp.sqrt(jnp.sum(logits * 0.0)))


@pytest.mark.parametrize("spoil,stop,message", [
    (_nan_loss, 6, "the training loss became nan by step 4"),
    # Step 3's loss is finite, its update is not: caught at step 3, before the save.
    (_nan_gradients, 3, "the gradients of 1 step.s. were not finite by step 3")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch,
                                                             spoil, stop, message):
  workdir = str(tmp_path / "run")
  config = tiny_config(checkpoint_every=2)
  train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=2), workdir, data=tiny_data)
  good, _ = _params(workdir)
  monkeypatch.setattr(train_lib, "loss_fn", spoil(train_lib.loss_fn))
  with pytest.raises(TrainingDivergedError, match=message + r".*last good checkpoint \(step 2\)"):
    train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=stop), workdir,
                                 data=tiny_data)
  store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"))
  assert store.all_steps() == [2]
  after, _ = _params(workdir)
  jax.tree.map(np.testing.assert_array_equal, good, after)


def test_a_run_closes_its_checkpoint_store_when_it_ends_or_fails(tmp_path, tiny_data,
                                                                 monkeypatch):
  closed = []
  real_close = checkpoint_lib.CheckpointStore.close
  monkeypatch.setattr(checkpoint_lib.CheckpointStore, "close",
                      lambda self: (closed.append(self.directory), real_close(self)))
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=1), workdir, data=tiny_data)
  assert closed == [os.path.join(workdir, "checkpoints")]

  def fail(step):
    raise RuntimeError(f"stopped at step {step}")

  with pytest.raises(RuntimeError, match="stopped at step 1"):
    train_lib.train_and_evaluate(tiny_config(max_steps=2), str(tmp_path / "failed"),
                                 data=tiny_data, hooks=[fail])
  assert closed[1:] == [os.path.join(str(tmp_path / "failed"), "checkpoints")]
  # The lock went with it: the failed run resumes in this process.
  results = train_lib.train_and_evaluate(tiny_config(max_steps=2), str(tmp_path / "failed"),
                                         data=tiny_data)
  assert results["best_step"] == 2 and len(closed) == 3


def test_image_folder_data_selects_on_held_out_train_not_on_test(tiny_data, caplog):
  config = tiny_config()
  same_config, same_data = resolve_splits(config, tiny_data)  # CSV: as it is.
  assert same_config == config and same_data is tiny_data
  splits = np.where(tiny_data.splits == "Training", "train", "test")
  folder = dataclasses.replace(tiny_data, splits=splits)
  with caplog.at_level("WARNING"):
    resolved, data = resolve_splits(config, folder)
  # The folders are named as they are; the held-out tenth is said to be made here.
  assert ("this data has splits train, test, not FER2013's; using train_split=train, "
          "eval_split=validation, test_split=test; validation is a held-out tenth of train"
          in caplog.text)
  assert (resolved.train_split, resolved.eval_split, resolved.test_split) == (
      "train", "validation", "test")
  val, train, test = (data.split(s) for s in ("validation", "train", "test"))
  assert len(val) + len(train) == 64 and len(test) == 41
  assert not set(val.rows) & set(test.rows) and not set(val.rows) & set(train.rows)
  # A checkpoint saves the resolved config; evaluating it resolves again, on fresh folder data.
  again, again_data = resolve_splits(resolved, folder)
  assert again == resolved
  np.testing.assert_array_equal(again_data.splits, data.splits)


def test_a_run_on_image_folder_data_can_be_evaluated(tmp_path, tiny_data):
  splits = np.where(tiny_data.splits == "Training", "train", "test")
  folder = dataclasses.replace(tiny_data, splits=splits)
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(tiny_config(epochs=1), workdir, data=folder)
  metrics = evaluate_checkpoint(workdir, data=folder, output_dir=str(tmp_path / "eval"))
  assert metrics["split"] == "test" and metrics["num_examples"] == 41
  assert metrics["accuracy"] == pytest.approx(results["test_tta_none"]["accuracy"])
  # The FER2013 CSV for this run: its test split is missing, and the message says why
  # ("no split named 'test'" before); a split of that data named outright is evaluated.
  with pytest.raises(DataError, match=r"the run reports on its split 'test', which this data "
                     r"does not have \(it has Training, PublicTest, PrivateTest\)"):
    evaluate_checkpoint(workdir, data=tiny_data)
  other = evaluate_checkpoint(workdir, data=tiny_data, split="PrivateTest")
  assert other["split"] == "PrivateTest" and other["num_examples"] > 0


def test_checkpoint_keeps_latest_and_best(tmp_path):
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt")
  tree = {"w": jnp.arange(3.0)}
  for step, acc in ((1, 0.2), (2, 0.6), (3, None), (4, 0.4), (5, None)):
    store.save(step, model=tree, optimizer=tree, ema=None, meta={"step": step},
               eval_accuracy=acc)
  assert store.resolve("best") == 2 and store.resolve("latest") == 5
  assert sorted(store.all_steps()) == [2, 5]
  with pytest.raises(CheckpointError, match="no checkpoint at step 3"):
    store.resolve(3)
  # As in training, where every evaluation's checkpoint has an accuracy: a worse latest one
  # is kept for resuming but is not the best; a better one replaces the best.
  store.save(6, model=tree, optimizer=tree, ema=None, meta={"step": 6}, eval_accuracy=0.5)
  assert store.resolve("best") == 2 and store.resolve("latest") == 6
  assert sorted(store.all_steps()) == [2, 6]
  store.save(7, model=tree, optimizer=tree, ema=None, meta={"step": 7}, eval_accuracy=0.7)
  assert store.resolve("best") == 7 and sorted(store.all_steps()) == [7]


def test_ctrl_c_while_saving_lets_the_checkpoint_finish_then_interrupts(tmp_path, monkeypatch):
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt")
  tree = {"w": jnp.arange(3.0)}
  manager = store._manager
  real_save = manager.save

  def save_with_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # As Ctrl-C during the write.
    return real_save(*args, **kwargs)

  monkeypatch.setattr(manager, "save", save_with_ctrl_c)
  # Python's own Ctrl-C handler, as a program has it (a test runner may have another).
  runner_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      store.save(1, model=tree, optimizer=tree, ema=None, meta={"step": 1}, eval_accuracy=0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, runner_handler)
  assert store.all_steps() == [1] and sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
  store.close()
  reread = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", read_only=True)
  assert reread.read_meta(1) == {"step": 1}
  reread.close()


def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
  # Orbax reports a missing or damaged file with a bare Exception; it was a traceback.
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt")
  tree = {"w": jnp.arange(3.0)}
  store.save(1, model=tree, optimizer=tree, ema=None, meta={"step": 1}, eval_accuracy=0.5)
  store.close()
  data_files = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "ckpt" / "1" / "model")
                for f in files if os.path.basename(d) == "d"]
  assert data_files
  for f in data_files:
    os.remove(f)
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", read_only=True)
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(CheckpointError, match=r"ckpt/1: cannot read the checkpoint; is it damaged "
                     r"or incomplete\? \("):
    store.restore(1, model=abstract)
  shutil.rmtree(tmp_path / "ckpt" / "1" / "meta")
  with pytest.raises(CheckpointError, match="ckpt/1: cannot read the checkpoint"):
    store.read_meta(1)


def test_a_missing_checkpoint_item_is_named(tmp_path):
  # It read as "the checkpoint does not match the model", which sends the user to the model.
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt")
  tree = {"w": jnp.arange(3.0)}
  store.save(1, model=tree, optimizer=None, ema=None, meta={"step": 1}, eval_accuracy=0.5)
  store.close()
  store = checkpoint_lib.CheckpointStore(tmp_path / "ckpt", read_only=True)
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(CheckpointError, match=r"ckpt/1: has no 'optimizer' item \(it holds meta, "
                     r"metrics, model\)$"):
    store.restore(1, model=abstract, optimizer=abstract)
  # A tree of another shape is still a mismatch with the model.
  with pytest.raises(CheckpointError, match="ckpt/1: the checkpoint does not match the model"):
    store.restore(1, model={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})


def _load_as_if_ferplus(monkeypatch, workdir: str) -> None:
  """``checkpoint.load_model`` as if the run in ``workdir`` had FER+ labels."""
  real_load = checkpoint_lib.load_model

  def load(path, which="best", **kw):
    model, meta = real_load(path, which, **kw)
    if path == workdir:
      meta = {**meta, "labels": "ferplus", "class_names": [*meta["class_names"], "contempt"]}
    return model, meta

  monkeypatch.setattr(checkpoint_lib, "load_model", load)


def _tiny_ferplus_csv(tmp_path) -> pathlib.Path:
  """FER+ votes row-aligned with tiny_csv's 105 rows: happiness, contempt, "not a face", ..."""
  votes = ["0,10,0,0,0,0,0,0,0,0", "0,0,0,0,0,0,0,10,0,0", "0,0,0,0,0,0,0,0,0,10"]
  usage = ["Training"] * 64 + ["PublicTest"] * 20 + ["PrivateTest"] * 21
  ferplus = tmp_path / "fer2013new.csv"
  ferplus.write_text("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
                     "contempt,unknown,NF\n" + "".join(
                         f"{usage[i]},fer{i:07d}.png,{votes[i % 3]}\n" for i in range(105)))
  return ferplus


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data):
  """Two tiny finished runs (seeds 0 and 1), for the ensemble and the baseline tests."""
  root = tmp_path_factory.mktemp("two_runs")
  dirs = [str(root / name) for name in ("a", "b")]
  for seed, workdir in enumerate(dirs):
    train_lib.train_and_evaluate(tiny_config(max_steps=2, seed=seed), workdir, data=tiny_data)
  return dirs


@pytest.mark.xdist_group("two_runs")  # One worker trains the shared runs once.
def test_ensemble_averages_the_members_probabilities(two_runs, tmp_path, tiny_data, monkeypatch):
  dirs = two_runs
  out = tmp_path / "ensemble"
  metrics = evaluate_ensemble(dirs, output_dir=str(out), tta="flip", data=tiny_data,
                              batch_size=16)
  test = tiny_data.split("PrivateTest")
  probs = [predict_dataset(make_predict_fn(checkpoint_lib.load_model(d)[0], "flip"),
                           test.images, 16) for d in dirs]
  expected = classification_metrics((probs[0] + probs[1]) / 2, test.labels,
                                    tiny_data.class_names)
  assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
  assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
  assert metrics["confusion"] == expected["confusion"]
  assert metrics["model"] == "ensemble(acnn_alstm+acnn_alstm)"
  for member, p, d in zip(metrics["members"], probs, dirs):
    own = classification_metrics(p, test.labels, tiny_data.class_names)
    assert member["workdir"] == d and member["accuracy"] == pytest.approx(own["accuracy"])
  assert sorted(os.listdir(out)) == ["eval-ensemble-PrivateTest-tta_flip-confusion.png",
                                     "eval-ensemble-PrivateTest-tta_flip.json"]
  assert not any(f.startswith("eval-ensemble") for d in dirs for f in os.listdir(d))

  with pytest.raises(ConfigError, match="at least two runs"):
    evaluate_ensemble(dirs[:1], output_dir=str(out), data=tiny_data)
  with pytest.raises(ConfigError, match="is the workdir of member"):
    evaluate_ensemble(dirs, output_dir=dirs[1], data=tiny_data)
  # The same members again replace their report; another member set may not.
  again = evaluate_ensemble(dirs[::-1], output_dir=str(out), tta="flip", data=tiny_data,
                            batch_size=16)
  assert again["accuracy"] == pytest.approx(metrics["accuracy"])
  before = (out / "eval-ensemble-PrivateTest-tta_flip.json").read_text()
  with pytest.raises(ConfigError, match="already holds eval-ensemble-PrivateTest-tta_flip.json "
                     "for another ensemble"):
    evaluate_ensemble([dirs[0], dirs[0]], output_dir=str(out), tta="flip", data=tiny_data,
                      batch_size=16)
  assert (out / "eval-ensemble-PrivateTest-tta_flip.json").read_text() == before
  _load_as_if_ferplus(monkeypatch, dirs[1])
  with pytest.raises(ConfigError, match=f"{dirs[1]}: its model predicts ferplus classes"):
    evaluate_ensemble(dirs, output_dir=str(out), data=tiny_data)


@pytest.mark.xdist_group("two_runs")
def test_evaluate_against_a_baseline_compares_on_the_same_faces(two_runs, tmp_path, tiny_data,
                                                                 monkeypatch):
  from ferjax.inference import DEFAULT_WEIGHTS

  dirs = two_runs
  # The baseline is the shipped model (the two tiny runs agree on every face after 2 steps),
  # on labels set so that the two get different numbers of faces right: a swap would show.
  test = tiny_data.split("PrivateTest")
  probs = [predict_dataset(make_predict_fn(checkpoint_lib.load_model(d)[0], "flip"),
                           test.images, 16) for d in (dirs[0], DEFAULT_WEIGHTS)]
  here, there = probs[0].argmax(1), probs[1].argmax(1)
  neither = [next(c for c in range(7) if c not in (a, b)) for a, b in zip(here, there)]
  labels = np.where(np.arange(21) < 3, here, np.where(np.arange(21) < 10, there, neither))
  test = dataclasses.replace(test, labels=labels.astype(np.int32))
  metrics = evaluate_checkpoint(dirs[0], baseline=pathlib.Path(DEFAULT_WEIGHTS), tta="flip",
                                data=test, batch_size=16, output_dir=str(tmp_path / "out"))
  expected = paired_comparison(probs[0], probs[1], test.labels)
  assert expected["right_only_here"] < expected["right_only_in_baseline"]
  got = metrics["baseline"]
  assert (got["workdir"], got["model"], got["step"]) == (DEFAULT_WEIGHTS, "acnn_alstm", 43953)
  assert {k: got[k] for k in expected} == pytest.approx(expected)
  assert got["accuracy"] == pytest.approx(metrics["accuracy"])
  saved = json.load(open(metrics["files"][0]))
  assert saved["baseline"]["p_value"] == pytest.approx(expected["p_value"])
  # A baseline that cannot be compared fails before anything predicts.
  from ferjax import evaluate as evaluate_lib

  def must_not_predict(*args, **kwargs):
    raise AssertionError("predicted before the baseline had loaded")

  monkeypatch.setattr(evaluate_lib, "predict_dataset", must_not_predict)
  with pytest.raises(CheckpointError, match="missing: no such directory"):
    evaluate_checkpoint(dirs[0], baseline=str(tmp_path / "missing"), data=tiny_data)
  _load_as_if_ferplus(monkeypatch, dirs[1])
  with pytest.raises(ConfigError, match=f"--baseline={dirs[1]}: its model predicts ferplus "
                     f"classes .*, {dirs[0]}'s predicts fer2013 classes"):
    evaluate_checkpoint(dirs[0], baseline=dirs[1], data=tiny_data)


def test_evaluate_lists_and_draws_the_most_confident_mistakes(tmp_path, tiny_data, monkeypatch):
  from ferjax import evaluate as evaluate_lib
  from ferjax import plots
  from ferjax.inference import DEFAULT_WEIGHTS

  monkeypatch.delenv("FERPLUS_PATH", raising=False)  # CI sets it; the FER+ case is below.
  test = tiny_data.split("PrivateTest")
  probs = predict_dataset(make_predict_fn(checkpoint_lib.load_model(DEFAULT_WEIGHTS)[0], "flip"),
                          test.images, 16)
  # Labels the shipped model gets right on 7 faces and wrong on 14.
  predicted = probs.argmax(1)
  labels = np.where(np.arange(21) < 7, predicted, (predicted + 1) % 7)
  test = dataclasses.replace(test, labels=labels.astype(np.int32))
  metrics = evaluate_checkpoint(DEFAULT_WEIGHTS, tta="flip", data=test, batch_size=16,
                                output_dir=str(tmp_path / "mistakes"), mistakes=5)
  wrong = confident_mistakes(probs, test.labels, 5)
  assert len(wrong) == 5
  names = list(tiny_data.class_names)
  assert metrics["mistakes"] == [
      {"index": int(i), "row": int(test.rows[i]), "label": names[test.labels[i]],
       "predicted": names[probs[i].argmax()], "probability": pytest.approx(probs[i].max())}
      for i in wrong]
  assert metrics["files"][-1].endswith("-tta_flip-mistakes.png")
  assert os.path.getsize(metrics["files"][-1]) > 1000
  # All are listed; the grid draws the first MISTAKES_DRAWN (a PNG has a size limit).
  drawn = []
  with monkeypatch.context() as patch:
    patch.setattr(evaluate_lib, "MISTAKES_DRAWN", 3)
    patch.setattr(plots, "plot_face_grid", lambda faces, titles, path: drawn.append(titles))
    metrics = evaluate_checkpoint(DEFAULT_WEIGHTS, tta="flip", data=test, batch_size=16,
                                  output_dir=str(tmp_path / "mistakes"), mistakes=5)
  assert len(metrics["mistakes"]) == 5 and len(drawn) == 1 and len(drawn[0]) == 3
  assert drawn[0][0].startswith(f"row {metrics['mistakes'][0]['row']}: ")
  with pytest.raises(ConfigError, match="mistakes must be a whole number of at least 0, got -1"):
    evaluate_checkpoint(DEFAULT_WEIGHTS, data=test, mistakes=-1)
  # With FER+ votes, each mistake gets its row's FER+ majority: rows cycle through happiness,
  # contempt and "not a face" (no majority) here.
  metrics = evaluate_checkpoint(DEFAULT_WEIGHTS, tta="flip", data=test, batch_size=16,
                                output_dir=str(tmp_path / "mistakes"), mistakes=5,
                                ferplus_path=str(_tiny_ferplus_csv(tmp_path)))
  assert [m["ferplus"] for m in metrics["mistakes"]] == [
      ["happy", "contempt", None][m["row"] % 3] for m in metrics["mistakes"]]
  assert {m["row"] % 3 for m in metrics["mistakes"]} == {0, 1, 2}


def test_evaluate_refuses_a_checkpoint_of_another_model(tmp_path, tiny_data):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=1), workdir, data=tiny_data)
  with pytest.raises(CheckpointError, match="holds the model 'acnn_alstm', not 'dnn'"):
    evaluate_checkpoint(workdir, data=tiny_data, expect_model="dnn")
  with pytest.raises(CheckpointError, match="no such directory"):
    checkpoint_lib.load_model(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no checkpoints here"):
    checkpoint_lib.load_model(tmp_path / "empty")


def test_an_ensemble_with_a_missing_member_fails_before_predicting(tmp_path, tiny_data,
                                                                    monkeypatch):
  # Before: the first member was evaluated in full (minutes with ten-crop on the real
  # PrivateTest) and only then did the second turn out to be missing.
  from ferjax import evaluate as evaluate_lib
  from ferjax.inference import DEFAULT_WEIGHTS

  def must_not_predict(*args, **kwargs):
    raise AssertionError("predicted before every member had loaded")

  monkeypatch.setattr(evaluate_lib, "predict_dataset", must_not_predict)
  missing = str(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="missing: no such directory"):
    evaluate_ensemble([DEFAULT_WEIGHTS, missing], data=tiny_data, output_dir=str(tmp_path / "e"))
  assert not (tmp_path / "e").exists()


def test_a_step_folder_given_as_the_run_is_pointed_at_its_run_and_which():
  # Before: "<run>/checkpoints/43953: no checkpoints here", for a folder that holds one.
  from ferjax.inference import DEFAULT_WEIGHTS
  step_dir = os.path.join(DEFAULT_WEIGHTS, "checkpoints", "43953")
  with pytest.raises(CheckpointError, match=f"^{step_dir} is one checkpoint .step 43953.; name "
                     f"its run, {DEFAULT_WEIGHTS}, and the step with --which=43953$"):
    checkpoint_lib.load_model(step_dir)


def test_evaluate_checks_its_arguments_and_the_datas_label_set(tmp_path, tiny_data):
  from ferjax.data import FERPLUS_CLASSES
  from ferjax.inference import default_weights_dir
  weights, out = default_weights_dir(), str(tmp_path / "out")  # A FER2013 (7-class) model.
  # Before: FER+ data (label 7) raised an IndexError from the metrics.
  ferplus = dataclasses.replace(tiny_data, labels=np.full(len(tiny_data), 7, np.int32),
                                class_names=FERPLUS_CLASSES)
  with pytest.raises(ConfigError, match="predicts fer2013 classes .* the data has .*contempt"):
    evaluate_checkpoint(weights, data=ferplus, output_dir=out)
  # Before: an AttributeError ('str' object has no attribute 'split_names').
  with pytest.raises(TypeError, match="data must be a FerData .* got str; pass a file as data_"):
    evaluate_checkpoint(weights, data=tiny_data.source, output_dir=out)
  # Before: range() arg 3 must not be zero, after the model and data had loaded.
  with pytest.raises(ConfigError, match="batch_size must be a whole number of at least 1, got 0"):
    evaluate_checkpoint(weights, data=tiny_data, batch_size=0, output_dir=out)
  with pytest.raises(ConfigError, match="tta must be one of none, flip, ten_crop, got 'flop'"):
    evaluate_ensemble([weights, weights], data=tiny_data, tta="flop", output_dir=out)
  assert not os.path.exists(out)


def test_training_refuses_data_of_another_label_set_before_writing(tmp_path, tiny_data):
  from ferjax.data import FERPLUS_CLASSES
  workdir = tmp_path / "run"
  # Before: an AttributeError ('str' object has no attribute 'split_names').
  with pytest.raises(TypeError, match="data must be a FerData .* got str; pass a file as data_"):
    train_lib.train_and_evaluate(tiny_config(max_steps=1), str(workdir), data=tiny_data.source)
  # Before: FER2013 data trained a 7-class model saved as a FER+ run (and soft_targets
  # trained on the hard labels), silently.
  with pytest.raises(ConfigError, match="labels=ferplus, but the data has the 7 classes angry, "
                                        ".*relabel it with ferjax.data.with_ferplus_labels"):
    train_lib.train_and_evaluate(tiny_config(labels="ferplus", max_steps=1), str(workdir),
                                 data=tiny_data)
  ferplus = dataclasses.replace(tiny_data, class_names=FERPLUS_CLASSES)
  with pytest.raises(ConfigError, match="labels=fer2013, but the data has FER\\+ labels"):
    train_lib.train_and_evaluate(tiny_config(max_steps=1), str(workdir), data=ferplus)
  with pytest.raises(ConfigError, match="soft_targets needs FER\\+ vote distributions"):
    train_lib.train_and_evaluate(tiny_config(labels="ferplus", soft_targets=True, max_steps=1),
                                 str(workdir), data=ferplus)
  assert not workdir.exists()


def test_evaluate_takes_data_holding_only_the_reported_split(tmp_path, tiny_data):
  from ferjax.inference import default_weights_dir
  weights, out = default_weights_dir(), str(tmp_path / "out")
  whole = evaluate_checkpoint(weights, data=tiny_data, output_dir=out)
  # Before: ConfigError "--train_split=Training: the data has splits PrivateTest".
  alone = evaluate_checkpoint(weights, data=tiny_data.split("PrivateTest"), output_dir=out)
  assert alone["split"] == "PrivateTest" and alone["num_examples"] == 21
  assert alone["accuracy"] == whole["accuracy"] and alone["confusion"] == whole["confusion"]
  with pytest.raises(DataError, match="the run reports on its split 'PrivateTest', which this "
                     r"data does not have \(it has PublicTest\)"):
    evaluate_checkpoint(weights, data=tiny_data.split("PublicTest"), output_dir=out)


_RUNNER = textwrap.dedent("""
    import os, signal, sys, json
    import numpy as np, jax
    from flax import nnx
    from ferjax import train, checkpoint, cli
    cli.setup_logging()
    from ferjax.config import TrainConfig
    workdir, data_path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = TrainConfig(model="acnn_alstm", model_overrides=dict(widths=(4, 4, 8, 8),
        lstm_hidden=8, attention_size=8), epochs=3, batch_size=16, eval_batch_size=16,
        checkpoint_every=3, ema_decay=0.5, learning_rate=3e-3)
    def hook(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train.train_and_evaluate(config, workdir, data_path=data_path, hooks=[hook])
    model, meta = checkpoint.load_model(workdir, "latest")
    np.savez(os.path.join(workdir, "final.npz"),
             *[np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.RngState)))])
    print("devices", jax.device_count())
""")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A JAX persistent compilation cache shared by this module's training subprocesses.

  Each run compiles the same training step and prediction programs, for tens of seconds on
  2 cores; a run of the same shapes, flags and device count reads them back instead. The
  programs are the ones a fresh compile gives, so the runs' numbers do not change.
  """
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run(args, env_extra=None):
  env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
  return subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], env=env,
                        capture_output=True, text=True, check=False, timeout=600)


def _final(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as z:
    return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_csv, xla_cache):
  """The uninterrupted one-device run that the resumed and the two-device runs are held to."""
  straight = tmp_path_factory.mktemp("straight")
  r = _run([straight, tiny_csv, -1], xla_cache)
  assert r.returncode == 0, r.stderr[-2000:]
  return straight, r


@pytest.mark.xdist_group("straight_run")  # One worker runs the shared fixture once.
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_csv, xla_cache,
                                                            straight_run):
  (straight, _), killed = straight_run, tmp_path / "killed"
  first = _run([killed, tiny_csv, 7], xla_cache)  # Mid-epoch 2, after the checkpoint at step 6.
  assert first.returncode == -9, first.stderr[-2000:]
  assert checkpoint_lib.CheckpointStore(killed / "checkpoints").latest_step() == 6
  resumed = _run([killed, tiny_csv, -1], xla_cache)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming" in resumed.stderr
  for a, b in zip(_final(straight), _final(killed), strict=True):
    np.testing.assert_array_equal(a, b)
  # The logged training metrics too: the record at step 8 counts steps 5-8, two of them
  # before the checkpoint at step 6 that the run resumed from.
  records = {run: {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl"))}
             for run in (straight, killed)}
  assert sorted(records[killed]) == sorted(records[straight]) == [4, 8, 12]
  for step in (4, 8, 12):
    for key in ("train_loss", "train_accuracy", "eval_loss"):
      assert records[killed][step][key] == pytest.approx(records[straight][step][key]), (step, key)


@pytest.mark.xdist_group("straight_run")
def test_two_devices_match_one(tmp_path, tiny_csv, xla_cache, straight_run):
  (one, r1), two = straight_run, tmp_path / "two"
  r2 = _run([two, tiny_csv, -1], {**xla_cache,
                                  "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
  assert "devices 1" in r1.stdout and "devices 2" in r2.stdout
  for a, b in zip(_final(one), _final(two), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_a_two_process_distributed_run_matches_one_process_with_two_devices(tmp_path, tiny_csv):
  args = [sys.executable, "-m", "experiments.train", "--model=acnn_alstm",
          "--model_option=widths=(4,4,8,8)", "--model_option=lstm_hidden=8",
          "--model_option=attention_size=8", "--epochs=2", "--batch_size=16",
          "--eval_batch_size=16", f"--data={tiny_csv}"]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = _free_port()
  procs = [subprocess.Popen([*args, f"--workdir={multi}", "--distributed",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert "2 devices (cpu)" in err and "PrivateTest accuracy" in out
  two = subprocess.run([*args, f"--workdir={single}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False,
                       env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert two.returncode == 0, two.stderr[-3000:]
  # One record per evaluation (process 0 writes the files), the same numbers as one process
  # feeding two devices: each process contributed its half of every global batch.
  records = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
             for name in ("multi", "single")}
  assert [r["step"] for r in records["multi"]] == [r["step"] for r in records["single"]] == [4, 8]
  for a, b in zip(records["multi"], records["single"]):
    for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key
  results = {name: json.load(open(tmp_path / name / "results.json")) for name in records}
  assert results["multi"]["test_tta_ten_crop"]["loss"] == pytest.approx(
      results["single"]["test_tta_ten_crop"]["loss"], rel=1e-5)
  assert results["multi"]["test_tta_ten_crop"]["num_examples"] == 21


def test_distributed_settings_need_distributed():
  r = subprocess.run([sys.executable, "-m", "experiments.train", "--num_processes=2"], cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode != 0 and "need --distributed" in r.stderr


def test_ema_follows_its_update_rule_and_is_what_evaluation_uses(tiny_data):
  from ferjax import parallel
  config = tiny_config(ema_decay=0.5)
  mesh = parallel.make_mesh()
  trainer = train_lib.Trainer(config, 7, mesh, total_steps=10, steps_per_epoch=4,
                              weights=np.ones(7, np.float32))
  params = lambda state: jax.tree.map(np.asarray, nnx.filter_state(state, nnx.Param))
  train = tiny_data.split("Training")
  batch = parallel.shard_batch({"image": train.images[:16], "label": train.labels[:16]}, mesh)
  metrics = trainer.zero_metrics()
  seen = [params(trainer.state["model"])]
  for step in range(2):
    trainer.state, metrics = trainer.train_step(trainer.state, metrics, batch,
                                                jnp.asarray(step, jnp.int32))
    seen.append(params(trainer.state["model"]))
  # ema_0 = p_0; ema_t = d * ema_{t-1} + (1 - d) * p_t, d = 0.5.
  expected = jax.tree.map(lambda p0, p1, p2: 0.25 * p0 + 0.25 * p1 + 0.5 * p2, *seen)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.tree.map(np.asarray, trainer.state["ema"]), expected)
  assert not np.allclose(jax.tree.leaves(expected)[0], jax.tree.leaves(seen[2])[0])
  # Evaluation predicts with the EMA parameters, not the raw ones.
  model = train_lib.build_model(config, 7)
  nnx.update(model, trainer.state["model"])
  model.eval()
  raw = np.asarray(jax.nn.softmax(model(preprocess(train.images[:4])), axis=-1))
  nnx.update(model, trainer.state["ema"])
  with_ema = np.asarray(jax.nn.softmax(model(preprocess(train.images[:4])), axis=-1))
  got = np.asarray(trainer.predict(jnp.asarray(train.images[:4])))
  np.testing.assert_allclose(got, with_ema, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got, raw, atol=1e-6)


def test_weight_averaging_averages_the_averaged_epochs_and_reports_the_average(
    tmp_path, tiny_data, monkeypatch, caplog):
  from ferjax.recalibrate import batch_norm_layers, recalibrate_batch_norm
  trainers, seen = [], {}
  init = train_lib.Trainer.__init__
  monkeypatch.setattr(train_lib.Trainer, "__init__",
                      lambda self, *a, **k: (trainers.append(self), init(self, *a, **k))[1])

  def keep(step):  # The parameters at the end of each epoch (4 steps of 16 faces).
    if step % 4 == 0:
      seen[step] = jax.tree.map(np.asarray, nnx.filter_state(trainers[0].state["model"],
                                                             nnx.Param))

  workdir = str(tmp_path / "run")
  config = tiny_config(epochs=3, swa_epochs=2, swa_learning_rate=1e-3)
  with caplog.at_level(logging.INFO, logger="ferjax.train"):
    results = train_lib.train_and_evaluate(config, workdir, data=tiny_data, hooks=[keep])
  assert trainers[0]._swa_update._cache_size() == 1
  assert results["swa"]["epochs"] == [2, 3] and results["swa"]["count"] == 2
  assert results["swa"]["learning_rate"] == 1e-3 and results["swa"]["batch_norm_recalibrated"]
  # The average of the weights at the ends of epochs 2 and 3; not epoch 1's.
  average, meta = _params(os.path.join(workdir, "swa"))
  expected = jax.tree.map(lambda a, b: (a + b) / 2, seen[8], seen[12])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), average,
               expected)
  assert not np.allclose(jax.tree.leaves(expected)[0], jax.tree.leaves(seen[12])[0])
  assert meta["swa"]["epochs"] == [2, 3] and meta["model"] == "acnn_alstm"
  # Its BatchNorm statistics are recomputed for the averaged weights on the training faces.
  swa_model, _ = checkpoint_lib.load_model(os.path.join(workdir, "swa"))
  last, _ = checkpoint_lib.load_model(workdir, "latest")
  nnx.update(last, jax.tree.map(jnp.asarray, expected))
  want = recalibrate_batch_norm(last, tiny_data.split("Training").images, seed=config.seed)
  for (_, got), (_, ref) in zip(batch_norm_layers(swa_model), batch_norm_layers(want),
                                strict=True):
    np.testing.assert_allclose(got.mean[...], ref.mean[...], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.var[...], ref.var[...], rtol=1e-4, atol=1e-6)
  # The run's result is the average; the best checkpoint's metrics are kept beside it.
  averaged = evaluate_checkpoint(os.path.join(workdir, "swa"), data=tiny_data, batch_size=16)
  best = evaluate_checkpoint(workdir, checkpoint="best", data=tiny_data, batch_size=16)
  assert results["test_tta_none"]["loss"] == pytest.approx(averaged["loss"], rel=1e-5)
  assert results["best_checkpoint"]["test_tta_none"]["loss"] == pytest.approx(best["loss"],
                                                                              rel=1e-5)
  assert results["best_checkpoint"]["step"] == results["best_step"]
  assert averaged["loss"] != pytest.approx(best["loss"], rel=1e-5)
  assert any("for the average of 2 epochs" in r.getMessage() for r in caplog.records)
  # Started again, the finished run reports what it reported, without training.
  again = train_lib.train_and_evaluate(config, workdir, data=tiny_data)
  assert again == json.loads(json.dumps(results))


def test_a_resumed_weight_average_matches_an_uninterrupted_one(tmp_path, tiny_data, caplog):
  config = tiny_config(epochs=3, swa_epochs=2, swa_learning_rate=1e-3)
  straight = str(tmp_path / "straight")
  train_lib.train_and_evaluate(config, straight, data=tiny_data)
  resumed = str(tmp_path / "resumed")
  with caplog.at_level(logging.WARNING, logger="ferjax.train"):
    early = train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=3), resumed,
                                         data=tiny_data)
  # Stopped before any averaged epoch: the best checkpoint is the result, and it says so.
  assert early["swa"]["count"] == 0 and "best_checkpoint" not in early
  assert not os.path.exists(os.path.join(resumed, "swa"))
  assert any("no averaged epoch finished" in r.getMessage() for r in caplog.records)
  middle = train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=10), resumed,
                                        data=tiny_data)
  assert middle["swa"]["epochs"] == [2]
  final = train_lib.train_and_evaluate(config, resumed, data=tiny_data)
  assert final["swa"]["epochs"] == [2, 3]
  a, _ = _params(os.path.join(straight, "swa"))
  b, _ = _params(os.path.join(resumed, "swa"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not os.path.exists(os.path.join(resumed, "swa.partial"))


def test_the_schedule_decays_to_the_averaging_rate_and_holds_it():
  config = tiny_config(epochs=10, swa_epochs=3, learning_rate=1.0, swa_learning_rate=0.05,
                       warmup_epochs=1)
  schedule = train_lib.learning_rate_schedule(config, 100, 10)
  rates = np.array([float(schedule(i)) for i in range(100)])
  assert rates[0] == 0 and rates[10] == pytest.approx(1.0)
  assert np.all(np.diff(rates[10:71]) <= 1e-7)  # Cosine decay from the peak...
  assert rates[69] > 0.05
  np.testing.assert_allclose(rates[70:], 0.05, rtol=1e-6)  # ...to the averaging rate, held.
  assert tiny_config(epochs=10, swa_epochs=3, learning_rate=1.0).swa_lr == pytest.approx(0.1)
  plain = train_lib.learning_rate_schedule(dataclasses.replace(config, swa_epochs=0,
                                                               swa_learning_rate=None), 100, 10)
  assert float(plain(99)) < 0.01  # Without averaging: down to 1e-3 of the peak.
  # Every epoch averaged (fine-tuning a trained run with --init_from): warm-up to the
  # averaging rate, then held.
  every = train_lib.learning_rate_schedule(
      tiny_config(epochs=3, swa_epochs=3, swa_learning_rate=0.05, warmup_epochs=1), 30, 10)
  assert float(every(0)) == 0 and float(every(5)) == pytest.approx(0.025)
  np.testing.assert_allclose([float(every(i)) for i in range(10, 30)], 0.05, rtol=1e-6)
  held = train_lib.learning_rate_schedule(
      tiny_config(epochs=3, swa_epochs=3, swa_learning_rate=0.05, warmup_epochs=0), 30, 10)
  np.testing.assert_allclose([float(held(i)) for i in range(30)], 0.05, rtol=1e-6)


def test_default_configs_are_valid():
  from ferjax.models import model_names
  for name in model_names():
    c = default_config(name)
    assert c.model == name and TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  with pytest.raises(ConfigError, match="optimizer must be one of adamw, adam, sgd"):
    default_config("dnn", optimizer="lamb")
  with pytest.raises(ConfigError, match="soft_targets needs labels=ferplus"):
    default_config("dnn", soft_targets=True)


def test_from_dict_leaves_the_dict_it_reads_unchanged():
  # load_model's meta["config"] is read by from_dict (evaluation) and then written out
  # again: from_dict used to turn its augment lists into tuples in place.
  saved = json.loads(json.dumps(default_config("dnn").to_dict()))
  before = json.loads(json.dumps(saved))
  assert TrainConfig.from_dict(saved) == default_config("dnn")
  assert saved == before and isinstance(saved["augment"]["erase_area"], list)


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=16.0), "batch_size must be a whole number, got 16.0"),
    (dict(epochs="2"), "epochs must be a whole number, got '2'"),
    (dict(seed=True), "seed must be a whole number, got True"),
    (dict(max_steps=2.5), "max_steps must be a whole number, got 2.5"),
    (dict(learning_rate="1e-3"), "learning_rate must be a finite number, got '1e-3'"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number, got inf"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number, got nan"),
    (dict(grad_clip=float("nan")), "grad_clip must be a finite number, got nan"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\), got 1.5"),
    # Before: "weight_decay, grad_clip and warmup_epochs must not be negative", for any one.
    (dict(warmup_epochs=-1), r"^warmup_epochs must not be negative, got -1$"),
    (dict(grad_clip=-0.5), r"^grad_clip must not be negative, got -0.5$"),
    (dict(model_overrides=None), "model_overrides must be a dict of model options, got None"),
    (dict(swa_epochs=3), r"swa_epochs must be between 0 and epochs \(2\), got 3"),
    (dict(swa_epochs=1.5), "swa_epochs must be a whole number, got 1.5"),
    (dict(swa_learning_rate=1e-3), "swa_learning_rate needs swa_epochs"),
    (dict(swa_epochs=1, swa_learning_rate=0.0), "swa_learning_rate must be positive, got 0.0"),
    (dict(swa_epochs=1, ema_decay=0.9), "ema_decay and swa_epochs both average the weights"),
    (dict(augment={"mixup_alpha": 0.2}), "augment must be a ferjax.augment.AugmentConfig"),
    # Before: accepted; distill_from=3 failed in training as an AttributeError (no .split).
    (dict(distill_from=3), r"distill_from must be a path \(a run's workdir\), got 3"),
    (dict(init_from=["runs/a"]), r"init_from must be a path \(a run's workdir\), got \['runs/a'\]"),
])
def test_a_config_field_of_the_wrong_type_or_value_is_a_config_error(changes, message):
  # Each of these used to pass and fail later inside training (numpy's "seed must be
  # integer", a dict without .warps), after the workdir was written, or trained on NaN.
  with pytest.raises(ConfigError, match=message):
    tiny_config(**changes)
  with pytest.raises(ConfigError, match="unknown augment fields .'mixup'."):
    TrainConfig.from_dict({"augment": {"mixup": 0.2}})
  # Integers where floats are expected, and numpy scalars, are fine.
  c = tiny_config(learning_rate=1, weight_decay=np.float32(0), epochs=np.int64(2))
  assert c.learning_rate == 1 and c.epochs == 2
  # A pathlib.Path is kept as text (before, json.dump of config.json failed on it half-way
  # through writing the file, in the new workdir).
  import pathlib
  c = tiny_config(init_from=pathlib.Path("runs", "a"), distill_from=pathlib.Path("runs", "b"))
  assert (c.init_from, c.distill_from) == (os.path.join("runs", "a"), os.path.join("runs", "b"))
  json.dumps(c.to_dict())


def test_class_weights_follow_the_class_frequencies_with_mean_one():
  labels = np.array([0] * 6 + [1] * 3 + [2])  # Class 3 is absent.
  for mode in ("none", "balanced", "sqrt"):
    w = train_lib.class_weights(labels, 4, mode)
    assert w.shape == (4,) and np.isfinite(w).all()
    assert w[labels].mean() == pytest.approx(1.0, rel=1e-6), mode  # The loss keeps its scale.
  np.testing.assert_array_equal(train_lib.class_weights(labels, 4, "none"), np.ones(4))
  # balanced: 1/frequency, so every present class carries the same total weight.
  balanced = train_lib.class_weights(labels, 4, "balanced")
  np.testing.assert_allclose(np.bincount(labels, weights=balanced[labels]), [10 / 3] * 3,
                             rtol=1e-6)
  # sqrt: 1/sqrt(frequency); 6 examples against 1 weigh sqrt(6) times less.
  sqrt = train_lib.class_weights(labels, 4, "sqrt")
  assert sqrt[2] / sqrt[0] == pytest.approx(np.sqrt(6), rel=1e-6)
  assert sqrt[2] / sqrt[1] == pytest.approx(np.sqrt(3), rel=1e-6)


def test_the_loss_is_the_class_weighted_mean_cross_entropy():
  logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0])
  weights = np.array([1.0, 2.0, 3.0], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  nll = -log_p[np.arange(4), labels]
  w = weights[labels]
  got = train_lib.loss_fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), 0.0)
  assert float(got) == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-5)
  assert float(got) != pytest.approx(float(nll.mean()), rel=1e-3)  # The weights matter here.
  # Per-example weights (mixed faces) replace the class weights.
  ex = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
  got = train_lib.loss_fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), 0.0,
                          example_weights_B=jnp.asarray(ex))
  assert float(got) == pytest.approx(float((ex * nll).sum() / ex.sum()), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_the_optimizer_decays_kernels_only_warms_up_and_clips(optimizer):
  import optax
  params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,)), "query": jnp.ones((4,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Zero gradients: whatever moves is weight decay, which spares biases, norms and queries.
  tx = train_lib.make_optimizer(tiny_config(optimizer=optimizer, weight_decay=0.1,
                                            learning_rate=0.5, warmup_epochs=0), 100, 10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert (np.asarray(updates["kernel"]) < 0).all()  # Pulled towards zero.
  np.testing.assert_array_equal(updates["bias"], 0)
  np.testing.assert_array_equal(updates["query"], 0)
  # Warm-up from a learning rate of 0: the first step changes nothing, the next one does.
  tx = train_lib.make_optimizer(tiny_config(optimizer=optimizer, weight_decay=0.1,
                                            learning_rate=0.5, warmup_epochs=1), 100, 10)
  state = tx.init(params)
  first, state = tx.update(zeros, state, params)
  second, _ = tx.update(zeros, state, params)
  np.testing.assert_array_equal(first["kernel"], 0)
  assert (np.asarray(second["kernel"]) < 0).all()
  if optimizer == "sgd":  # Plain SGD: the step is lr times the (clipped) gradient.
    big = {**zeros, "kernel": jnp.full((3, 2), 100.0)}
    for clip, norm in ((1.0, 0.5), (0.0, 0.5 * 100 * np.sqrt(6))):
      tx = train_lib.make_optimizer(tiny_config(optimizer="sgd", weight_decay=0.0, momentum=0.0,
                                                learning_rate=0.5, warmup_epochs=0,
                                                grad_clip=clip), 100, 10)
      updates, _ = tx.update(big, tx.init(params), params)
      assert float(optax.tree.norm(updates)) == pytest.approx(norm, rel=1e-3), clip


def test_soft_targets_change_the_loss():
  logits = jnp.asarray([[2.0, 0.0, -1.0]])
  hard = train_lib.loss_fn(logits, jnp.asarray([0]), jnp.ones(3), 0.0)
  soft = train_lib.loss_fn(logits, jnp.asarray([0]), jnp.ones(3), 0.0,
                           jnp.asarray([[0.5, 0.5, 0.0]]))
  expected = -(0.5 * jax.nn.log_softmax(logits)[0, 0] + 0.5 * jax.nn.log_softmax(logits)[0, 1])
  assert float(soft) == pytest.approx(float(expected)) and float(hard) < float(soft)
  # Label smoothing applies on top of soft (distillation or FER+ vote) targets too.
  smoothed = train_lib.loss_fn(logits, jnp.asarray([0]), jnp.ones(3), 0.3,
                               jnp.asarray([[0.5, 0.5, 0.0]]))
  targets = 0.7 * np.asarray([0.5, 0.5, 0.0]) + 0.3 / 3
  expected = -float(jnp.sum(targets * jax.nn.log_softmax(logits)[0]))
  assert float(smoothed) == pytest.approx(expected, rel=1e-6)
  # And on one-hot labels: (1 - a) * onehot + a / C.
  smoothed = train_lib.loss_fn(logits, jnp.asarray([0]), jnp.ones(3), 0.3)
  targets = 0.7 * np.asarray([1.0, 0.0, 0.0]) + 0.3 / 3
  expected = -float(jnp.sum(targets * jax.nn.log_softmax(logits)[0]))
  assert float(smoothed) == pytest.approx(expected, rel=1e-6) and float(smoothed) > float(hard)


def test_export_writes_a_small_inference_checkpoint(tmp_path, tiny_data):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=2, ema_decay=0.5), workdir, data=tiny_data)
  out = tmp_path / "exported"
  meta = checkpoint_lib.export_model(workdir, out)
  assert meta["config"]["ema_decay"] == 0.0 and meta["exported_from"]["step"] == 2
  original, _ = _params(workdir, "best")  # load_model folds the EMA in.
  exported, _ = _params(out)
  jax.tree.map(np.testing.assert_array_equal, original, exported)
  # The fold-in itself: the loaded parameters are the checkpoint's EMA item, not its raw ones
  # (after 2 steps with decay 0.5 the two differ).
  model, _ = checkpoint_lib.load_model(workdir, "best")
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  store = checkpoint_lib.CheckpointStore(os.path.join(workdir, "checkpoints"), read_only=True)
  saved = store.restore(2, model=abstract(nnx.state(model, nnx.Not(nnx.RngState))),
                        ema=abstract(nnx.state(model, nnx.Param)))
  store.close()
  jax.tree.map(np.testing.assert_array_equal, original, jax.tree.map(np.asarray, saved["ema"]))
  raw = jax.tree.leaves(jax.tree.map(np.asarray, nnx.filter_state(saved["model"], nnx.Param)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(original), raw, strict=True))
  assert not any("optimizer" in str(p) for p in out.rglob("*"))
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint_lib.export_model(workdir, out)


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path, tiny_data):
  # os.makedirs would fail only at the end, after training or evaluating, with a traceback
  # (NotADirectoryError, FileExistsError). Each is refused first, naming the flag.
  from ferjax.inference import DEFAULT_WEIGHTS

  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  with pytest.raises(ConfigError, match=r"--workdir=.*notes.txt/run: .*notes.txt is a file"):
    train_lib.train_and_evaluate(tiny_config(max_steps=1), str(a_file / "run"), data=tiny_data)
  with pytest.raises(ConfigError, match=r"--output=.*notes.txt/w: .*notes.txt is a file"):
    checkpoint_lib.export_model(DEFAULT_WEIGHTS, a_file / "w")
  test = tiny_data.split("PrivateTest")
  with pytest.raises(ConfigError, match=r"--output_dir=.*notes.txt is a file, not a folder"):
    evaluate_checkpoint(DEFAULT_WEIGHTS, data=test, output_dir=str(a_file))
  with pytest.raises(ConfigError, match=r"--output_dir=.*notes.txt/e: .*notes.txt is a file"):
    evaluate_ensemble([DEFAULT_WEIGHTS, str(tmp_path / "other")], data=test,
                      output_dir=str(a_file / "e"))
  assert a_file.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_export_weights_cli_exports_the_checkpoint_named_by_which(tmp_path, tiny_data):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=2, eval_every=1), workdir, data=tiny_data)
  out = tmp_path / "exported"

  def export(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.export_weights",
                           f"--workdir={workdir}", f"--output={out}", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)

  r = export("--which=7")  # No such step: a one-line error, nothing written.
  assert r.returncode == 2 and "no checkpoint at step 7" in r.stderr and not out.exists()
  r = export("--checkpoint=latest")  # The earlier name of --which.
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"step 2 to {out}" in r.stdout
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, "latest")[0], _params(out)[0])


def test_ferplus_labels_train_an_8_class_model(tmp_path, tiny_csv):
  ferplus = _tiny_ferplus_csv(tmp_path)
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(
      tiny_config(labels="ferplus", soft_targets=True, max_steps=2), workdir,
      data_path=tiny_csv, ferplus_path=str(ferplus))
  assert results["labels"] == "ferplus"
  # Every third row is "not a face" and dropped: 21 - 7 PrivateTest rows remain.
  assert results["test_tta_none"]["num_examples"] == 14
  assert results["test_tta_none"]["class_names"][-1] == "contempt"
  model, meta = checkpoint_lib.load_model(workdir)
  assert meta["num_classes"] == 8 and model.classifier.out_features == 8


def test_distillation_mixes_the_teachers_predictions_into_the_targets(tmp_path, tiny_data):
  teacher_dir = str(tmp_path / "teacher")
  train_lib.train_and_evaluate(tiny_config(max_steps=2), teacher_dir, data=tiny_data)
  config = tiny_config(max_steps=1, distill_from=teacher_dir, distill_weight=0.25)
  train = tiny_data.split("Training")
  targets = distill_lib.training_targets(
      config, train, tiny_data.class_names,
      distill_lib.load_teachers(config, tiny_data.class_names, str(tmp_path / "student")))
  teacher, _ = checkpoint_lib.load_model(teacher_dir)
  probs = predict_dataset(make_predict_fn(teacher, "flip"), train.images, 16)
  np.testing.assert_allclose(targets, 0.75 * np.eye(7)[train.labels] + 0.25 * probs, atol=1e-6)
  np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
  assert distill_lib.training_targets(tiny_config(), train, tiny_data.class_names, []) is None
  # An exported folder (no optimiser state, as the shipped weights) teaches the same.
  exported = str(tmp_path / "exported")
  checkpoint_lib.export_model(teacher_dir, exported)
  config_exported = dataclasses.replace(config, distill_from=exported)
  np.testing.assert_allclose(distill_lib.training_targets(
      config_exported, train, tiny_data.class_names,
      distill_lib.load_teachers(config_exported, tiny_data.class_names, str(tmp_path / "s2"))),
      targets, atol=1e-6)
  results = train_lib.train_and_evaluate(config, str(tmp_path / "student"), data=tiny_data)
  assert results["config"]["distill_from"] == teacher_dir


def test_distillation_from_several_runs_averages_their_predictions(tmp_path, tiny_data):
  dirs = [str(tmp_path / f"teacher{seed}") for seed in (0, 1)]
  for seed, d in zip((0, 1), dirs):
    train_lib.train_and_evaluate(tiny_config(max_steps=2, seed=seed), d, data=tiny_data)
  train = tiny_data.split("Training")
  probs = [predict_dataset(make_predict_fn(checkpoint_lib.load_model(d)[0], "flip"),
                           train.images, 16) for d in dirs]
  assert not np.allclose(probs[0], probs[1], atol=1e-3)  # Two different teachers.
  config = tiny_config(distill_from=f"{dirs[0]}, {dirs[1]}", distill_weight=0.5)
  assert distill_lib.distill_sources(config) == dirs
  targets = distill_lib.training_targets(
      config, train, tiny_data.class_names,
      distill_lib.load_teachers(config, tiny_data.class_names, str(tmp_path / "student")))
  np.testing.assert_allclose(targets, 0.5 * np.eye(7)[train.labels] + 0.25 * (probs[0] + probs[1]),
                             atol=1e-6)


def test_a_resumed_student_keeps_the_teacher_predictions_it_started_with(tmp_path, tiny_data,
                                                                          caplog):
  teacher_dir, student = str(tmp_path / "teacher"), str(tmp_path / "student")
  train_lib.train_and_evaluate(tiny_config(max_steps=2), teacher_dir, data=tiny_data)
  config = tiny_config(max_steps=1, distill_from=teacher_dir)
  train_lib.train_and_evaluate(config, student, data=tiny_data)
  train = tiny_data.split("Training")
  first = predict_dataset(make_predict_fn(checkpoint_lib.load_model(teacher_dir)[0], "flip"),
                          train.images, 16)
  with np.load(os.path.join(student, distill_lib.TEACHER_FILE)) as saved:
    np.testing.assert_allclose(saved["probs"], first, atol=1e-6)
    assert saved["steps"].tolist() == [2]
  # The teacher's workdir now holds another run, whose best checkpoint predicts differently.
  other = str(tmp_path / "other")
  train_lib.train_and_evaluate(tiny_config(max_steps=3, seed=1), other, data=tiny_data)
  os.rename(teacher_dir, str(tmp_path / "teacher.old"))
  os.rename(other, teacher_dir)
  now_model, meta = checkpoint_lib.load_model(teacher_dir)
  now = predict_dataset(make_predict_fn(now_model, "flip"), train.images, 16)
  assert meta["step"] == 3 and not np.allclose(now, first, atol=1e-4)
  with caplog.at_level(logging.INFO, logger="ferjax"):
    train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=2), student, data=tiny_data)
  assert "reusing the teachers' predictions" in caplog.text
  assert f"{teacher_dir} (step 2 then, {meta['step']} now)" in caplog.text
  assert "distilling from" not in caplog.text
  teachers = distill_lib.load_teachers(config, tiny_data.class_names, student)
  targets = distill_lib.training_targets(config, train, tiny_data.class_names, teachers,
                                         workdir=student)
  np.testing.assert_allclose(targets, 0.5 * np.eye(7)[train.labels] + 0.5 * first, atol=1e-6)
  # Without a workdir (or with --fresh, which moves the run aside) the teacher predicts anew.
  fresh = distill_lib.training_targets(config, train, tiny_data.class_names, teachers)
  np.testing.assert_allclose(fresh, 0.5 * np.eye(7)[train.labels] + 0.5 * now, atol=1e-6)
  # A damaged file is not trusted: the teachers predict again and the file is rewritten.
  saved_file = os.path.join(student, distill_lib.TEACHER_FILE)
  with open(saved_file, "wb") as f:
    f.write(b"not an npz")
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="ferjax"):
    again = distill_lib.training_targets(config, train, tiny_data.class_names, teachers,
                                         workdir=student)
  assert "is unreadable" in caplog.text and "distilling from" in caplog.text
  np.testing.assert_allclose(again, fresh, atol=1e-6)
  with np.load(saved_file) as saved:
    assert saved["steps"].tolist() == [3]
  # Nor is a file saved for other training data or other teachers: predicted again, warned.
  relabelled = train.select(np.arange(len(train)))
  relabelled.labels[0] = (relabelled.labels[0] + 1) % 7
  renamed = [(str(tmp_path / "teacher.old"), model, meta) for _, model, meta in teachers]
  for split, teacher_list in ((relabelled, teachers), (train, renamed)):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ferjax"):
      distill_lib.training_targets(config, split, tiny_data.class_names, teacher_list,
                                   workdir=student)
    assert "does not match these teachers or this training data; predicting again" in caplog.text
    assert "distilling from" in caplog.text and "reusing" not in caplog.text


def test_a_student_distils_from_another_runs_saved_predictions(tmp_path, tiny_data, caplog):
  teacher_dir, first = str(tmp_path / "teacher"), str(tmp_path / "first")
  train_lib.train_and_evaluate(tiny_config(max_steps=2), teacher_dir, data=tiny_data)
  train_lib.train_and_evaluate(tiny_config(max_steps=1, distill_from=teacher_dir), first,
                               data=tiny_data)
  saved_file = os.path.join(first, distill_lib.TEACHER_FILE)
  train = tiny_data.split("Training")
  probs = predict_dataset(make_predict_fn(checkpoint_lib.load_model(teacher_dir)[0], "flip"),
                          train.images, 16)
  # With the teacher's checkpoints gone, its saved predictions still give the same targets.
  os.rename(teacher_dir, str(tmp_path / "gone"))
  config = tiny_config(max_steps=1, distill_from=saved_file, distill_weight=0.25)
  student = str(tmp_path / "student")
  with caplog.at_level(logging.INFO, logger="ferjax"):
    teachers = distill_lib.load_teachers(config, tiny_data.class_names, student, train)
  assert f"predictions saved in {saved_file} (teachers: {teacher_dir})" in caplog.text
  targets = distill_lib.training_targets(config, train, tiny_data.class_names, teachers,
                                         workdir=student)
  np.testing.assert_allclose(targets, 0.75 * np.eye(7)[train.labels] + 0.25 * probs, atol=1e-6)
  results = train_lib.train_and_evaluate(config, student, data=tiny_data)
  assert results["config"]["distill_from"] == saved_file
  with np.load(os.path.join(student, distill_lib.TEACHER_FILE)) as kept:  # Its own copy, to resume.
    np.testing.assert_allclose(kept["probs"], probs, atol=1e-6)
    assert kept["sources"].tolist() == [saved_file]
  # Refused before anything is written: other training data, a file among workdirs, not a file
  # of predictions.
  fewer = train.select(np.arange(len(train) - 1))
  with pytest.raises(ConfigError, match="shape"):
    distill_lib.load_teachers(config, tiny_data.class_names, student, fewer)
  relabelled = train.select(np.arange(len(train)))
  relabelled.labels[0] = (relabelled.labels[0] + 1) % 7
  with pytest.raises(ConfigError, match="other training images or labels"):
    distill_lib.load_teachers(config, tiny_data.class_names, student, relabelled)
  with pytest.raises(ConfigError, match="name it alone"):
    distill_lib.load_teachers(dataclasses.replace(config, distill_from=f"{saved_file},{first}"),
                              tiny_data.class_names, student, train)
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not an npz")
  fresh_dir = tmp_path / "never"
  with pytest.raises(DataError, match=f"^{junk}: --distill_from: not a file of saved teacher"):
    train_lib.train_and_evaluate(dataclasses.replace(config, distill_from=str(junk)),
                                 str(fresh_dir), data=tiny_data)
  assert not fresh_dir.exists()


def test_a_bad_teacher_is_refused_before_the_workdir_is_written(tmp_path, tiny_data):
  teacher = str(tmp_path / "teacher")
  train_lib.train_and_evaluate(tiny_config(max_steps=1), teacher, data=tiny_data)
  before = sorted(os.listdir(teacher))
  # The run's own workdir as its teacher: refused, the run left as it was.
  with pytest.raises(ConfigError, match="own --workdir"):
    train_lib.train_and_evaluate(tiny_config(max_steps=2, distill_from=teacher), teacher,
                                 data=tiny_data)
  assert sorted(os.listdir(teacher)) == before
  # A missing teacher: nothing is created for the student.
  student = tmp_path / "student"
  with pytest.raises(CheckpointError, match="^--distill_from: .*missing: no such directory"):
    train_lib.train_and_evaluate(
        tiny_config(max_steps=1, distill_from=f"{teacher},{tmp_path / 'missing'}"),
        str(student), data=tiny_data)
  assert not student.exists()


def test_init_from_starts_a_run_from_another_runs_best_weights(tmp_path, tiny_data, caplog):
  source = str(tmp_path / "source")
  train_lib.train_and_evaluate(tiny_config(max_steps=3, ema_decay=0.5), source, data=tiny_data)
  source_model, _ = checkpoint_lib.load_model(source)  # Its EMA: what evaluation uses.
  source_params = jax.tree.map(np.asarray, nnx.state(source_model, nnx.Param))
  # A learning rate too small to move anything: the first step's weights are the source's.
  config = tiny_config(max_steps=1, learning_rate=1e-12, init_from=source, seed=5,
                       ema_decay=0.9)
  with caplog.at_level(logging.INFO, logger="ferjax.train"):
    results = train_lib.train_and_evaluate(config, str(tmp_path / "tuned"), data=tiny_data)
  assert results["config"]["init_from"] == source
  assert f"starting from {source} (step 3)" in caplog.text
  assert "as initialised" not in caplog.text  # Same label set: every weight came across.
  tuned, _ = _params(str(tmp_path / "tuned"))  # Its EMA starts from the source too.
  for got, want in zip(jax.tree.leaves(tuned), jax.tree.leaves(source_params), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6)
  train_lib.train_and_evaluate(dataclasses.replace(config, init_from=None),
                               str(tmp_path / "fresh"), data=tiny_data)
  fresh, _ = _params(str(tmp_path / "fresh"))
  assert not np.allclose(jax.tree.leaves(fresh)[0], jax.tree.leaves(tuned)[0], atol=1e-3)


def test_init_from_a_run_with_another_label_set_starts_a_fresh_classifier(tiny_data):
  from ferjax import parallel

  source = train_lib.build_model(tiny_config(seed=1), 8)  # As a FER+ run's model: 8 classes.
  source_state = nnx.state(source, nnx.Not(nnx.RngState))
  trainer = train_lib.Trainer(tiny_config(), 7, parallel.make_mesh(), total_steps=4,
                              steps_per_epoch=2, weights=np.ones(7, np.float32))
  before = jax.tree.map(np.asarray, trainer.state["model"])
  assert not np.allclose(before["trunk"]["blocks"][0]["conv"]["kernel"][...],
                         source_state["trunk"]["blocks"][0]["conv"]["kernel"][...])
  assert trainer.start_from(source) == ["classifier.bias", "classifier.kernel"]
  after = trainer.state["model"]
  np.testing.assert_array_equal(after["classifier"]["kernel"][...],
                                before["classifier"]["kernel"][...])
  np.testing.assert_array_equal(after["trunk"]["blocks"][0]["conv"]["kernel"][...],
                                source_state["trunk"]["blocks"][0]["conv"]["kernel"][...])
  recurrent = lambda state: state["lstm"]["forward_layers"][0]["hidden_proj"]["kernel"][...]
  np.testing.assert_array_equal(recurrent(after), recurrent(source_state))


def test_a_bad_init_from_is_refused_before_the_workdir_is_written(tmp_path, tiny_data):
  source = str(tmp_path / "source")
  train_lib.train_and_evaluate(tiny_config(max_steps=1), source, data=tiny_data)
  run = tmp_path / "run"
  cases = [
      (dict(init_from=str(tmp_path / "missing")), CheckpointError,
       "^--init_from: .*missing: no such directory"),
      (dict(init_from=source, model="cnn_lstm"), ConfigError,
       "holds model 'acnn_alstm'; this run trains 'cnn_lstm'"),
      # Both sides as saved (widths a list, not a tuple on one side only, which read as a
      # difference where there was none).
      (dict(init_from=source, model_overrides={**TINY_ALSTM, "lstm_hidden": 16}), ConfigError,
       r"trained with model options \{'widths': \[4, 4, 8, 8\], 'lstm_hidden': 8, .*this run "
       r"has \{'widths': \[4, 4, 8, 8\], 'lstm_hidden': 16"),
  ]
  for changes, error, message in cases:
    with pytest.raises(error, match=message):
      train_lib.train_and_evaluate(tiny_config(max_steps=1, **changes), str(run), data=tiny_data)
    assert not run.exists()
  before = sorted(os.listdir(source))
  with pytest.raises(ConfigError, match="own --workdir; to go on training a run, run its command"):
    train_lib.train_and_evaluate(tiny_config(max_steps=2, init_from=source), source,
                                 data=tiny_data)
  assert sorted(os.listdir(source)) == before


def test_dropped_records_are_named_in_the_singular_or_plural(tmp_path, caplog):
  from ferjax import workdir as workdir_lib
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (8, 16, 24, 32)))
  with caplog.at_level(logging.WARNING, logger="ferjax"):
    workdir_lib.drop_records_after(str(tmp_path), 24)
    workdir_lib.drop_records_after(str(tmp_path), 8)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [8]
  messages = [r.getMessage() for r in caplog.records]
  assert "dropped the records of step 32, written after the last checkpoint (step 24)" in \
      messages[0]
  assert "dropped the records of steps 16, 24, written after the last checkpoint (step 8)" in \
      messages[1]


def test_a_missing_file_of_saved_predictions_is_called_a_missing_file(tmp_path, tiny_data):
  # Before: "no such directory", for a name that says it is a file.
  npz = tmp_path / "run" / distill_lib.TEACHER_FILE
  with pytest.raises(CheckpointError, match=f"^--distill_from: {npz}: no such file$"):
    train_lib.train_and_evaluate(tiny_config(max_steps=1, distill_from=str(npz)),
                                 str(tmp_path / "student"), data=tiny_data)
  assert not (tmp_path / "student").exists()


def test_the_compiling_first_step_is_left_out_of_images_per_second(tmp_path, tiny_data, caplog,
                                                                  monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(train_lib.time, "monotonic", lambda: clock[0])
  progress = train_lib._Progress(steps_per_epoch=100, batch_size=10)
  progress.start_epoch(0)
  clock[0] += 90.0  # The first step compiles...
  progress.restart_clock(1)
  clock[0] += 2.0  # ...then 20 steps of 10 images take 2 s.
  progress.current = 21
  assert progress.images_per_second() == pytest.approx(100.0)
  monkeypatch.undo()

  restarts = []
  original = train_lib._Progress.restart_clock
  monkeypatch.setattr(train_lib._Progress, "restart_clock",
                      lambda self, step: (restarts.append(step), original(self, step)))
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO, logger="ferjax"):
    train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)
    train_lib.train_and_evaluate(tiny_config(max_steps=4), workdir, data=tiny_data)  # Resumes.
  assert restarts == [1, 3]  # Once per process run, after its first (compiling) step.
  assert caplog.text.count("compiled and ran the first training step in") == 2


def test_a_finished_run_started_again_reports_without_evaluating_again(tmp_path, tiny_data,
                                                                       caplog, monkeypatch):
  workdir = str(tmp_path / "run")
  first = train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)
  evaluations = []
  original = train_lib._final_evaluation
  monkeypatch.setattr(train_lib, "_final_evaluation",
                      lambda *a, **k: (evaluations.append(1), original(*a, **k))[1])
  with caplog.at_level(logging.INFO, logger="ferjax"):
    again = train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)
  assert again == json.loads(json.dumps(first)) and not evaluations
  assert f"{workdir}: nothing left to train (step 2); its results (best step " in caplog.text
  # An incomplete report (a run stopped during its ten-crop evaluation) is evaluated again.
  path = os.path.join(workdir, "results.json")
  partial = {k: v for k, v in first.items() if k != "test_tta_ten_crop"}
  json.dump(partial, open(path, "w"))
  again = train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)
  assert evaluations == [1] and "test_tta_ten_crop" in json.load(open(path))
  assert again["test_tta_ten_crop"] == first["test_tta_ten_crop"]


def test_a_workdir_another_process_is_training_in_is_refused_and_left_alone(tmp_path,
                                                                            tiny_data):
  import fcntl
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(max_steps=1), workdir, data=tiny_data)
  before = sorted(os.listdir(workdir)), open(os.path.join(workdir, "metrics.jsonl")).read()
  # Another process's lock: flock locks of separate opens exclude each other, as processes do.
  other = os.open(workdir, os.O_RDONLY)
  fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  try:
    for fresh in (False, True):  # --fresh does not move a run that is being trained aside.
      with pytest.raises(ConfigError, match=r"is in use by another training process"):
        train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data,
                                     fresh=fresh)
      assert os.listdir(tmp_path) == ["run"]
      assert (sorted(os.listdir(workdir)),
              open(os.path.join(workdir, "metrics.jsonl")).read()) == before
    # The run holds its folder while it trains, and lets go when it ends.
    held = []
    train_lib.train_and_evaluate(tiny_config(max_steps=1), str(tmp_path / "other"),
                                 data=tiny_data, hooks=[lambda step: held.append(
                                     _is_locked(str(tmp_path / "other")))])
    assert held == [True] and not _is_locked(str(tmp_path / "other"))
  finally:
    os.close(other)
  train_lib.train_and_evaluate(tiny_config(max_steps=2), workdir, data=tiny_data)  # Resumes.


def _is_locked(path: str) -> bool:
  import fcntl
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)
