"""BatchNorm statistics recomputed on unaugmented training faces."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import fer_rows, write_csv
from ferjax import checkpoint as checkpoint_lib
from ferjax import recalibrate
from ferjax import train as train_lib
from ferjax.config import TrainConfig
from ferjax.data import load_fer2013
from ferjax.errors import CheckpointError, ConfigError
from ferjax.models import create_model
from ferjax.preprocess import preprocess

# The tests here share a trained run (a module fixture): one pytest-xdist worker runs
# them all, so it is trained once.
pytestmark = pytest.mark.xdist_group("test_recalibrate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ALSTM = dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8)


def _faces(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


def _statistics(model):
  return [(np.asarray(m.mean[...]), np.asarray(m.var[...]))
          for _, m in recalibrate.batch_norm_layers(model)]


def _trained_like(model):
  """Running statistics far from any batch's, as after training on other faces."""
  for _, norm in recalibrate.batch_norm_layers(model):
    norm.mean[...] = norm.mean[...] + 3.0
    norm.var[...] = norm.var[...] * 5.0
  return model


def test_one_batch_makes_eval_mode_match_train_mode_on_it():
  # Recalibrated on exactly these faces, every BatchNorm's running statistics are their batch
  # statistics, so eval mode predicts them as train mode (dropout off) does, layer after layer.
  model = _trained_like(create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_ALSTM))
  faces = _faces(32)
  recalibrated = recalibrate.recalibrate_batch_norm(model, faces, batch_size=32)
  train_mode = nnx.clone(model)
  train_mode.eval()
  for _, norm in recalibrate.batch_norm_layers(train_mode):
    norm.use_running_average = False
  x = preprocess(faces)
  want = np.asarray(train_mode(x))
  np.testing.assert_allclose(np.asarray(recalibrated(x)), want, rtol=1e-4, atol=1e-4)
  model.eval()
  assert not np.allclose(np.asarray(model(x)), want, atol=1e-2)  # As trained: not so.


def test_statistics_are_the_mean_of_the_batch_statistics_and_nothing_else_changes(caplog):
  model = _trained_like(create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(1), **TINY_ALSTM))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngState)))
  faces = _faces(70, seed=2)
  with caplog.at_level(logging.INFO, logger="ferjax"):
    recalibrated = recalibrate.recalibrate_batch_norm(model, faces, batch_size=32, seed=5,
                                                      log_every_s=0.0)
  # Progress while it works (here at every batch the loop has waited for).
  assert "BatchNorm statistics: 1/2 batches" in caplog.text
  # Two batches of 32 in the seed's order; 6 faces left out.
  order = np.random.default_rng(5).permutation(70)[:64]
  conv = model.trunk.blocks[0].conv
  outputs = [np.asarray(conv(preprocess(faces[order[i:i + 32]]))) for i in (0, 32)]
  mean, var = _statistics(recalibrated)[0]
  np.testing.assert_allclose(mean, np.mean([y.mean((0, 1, 2)) for y in outputs], 0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(var, np.mean([y.var((0, 1, 2)) for y in outputs], 0),
                             rtol=1e-3, atol=1e-5)
  assert len(_statistics(recalibrated)) == 4
  for (m0, v0), (m1, v1) in zip(_statistics(model), _statistics(recalibrated)):
    assert not np.allclose(m0, m1) and not np.allclose(v0, v1)
  # The parameters are copied unchanged, and the model given is left as it was.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(before, nnx.Param),
               jax.tree.map(np.asarray, nnx.state(recalibrated, nnx.Param)))
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngState))))


def test_a_model_without_batch_norm_or_faces_is_refused():
  with pytest.raises(ConfigError, match="no BatchNorm layer"):
    recalibrate.recalibrate_batch_norm(create_model("dnn", num_classes=7, rngs=nnx.Rngs(0)), _faces(4))
  plain = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), batch_norm=False, **TINY_ALSTM)
  with pytest.raises(ConfigError, match="no BatchNorm layer"):
    recalibrate.recalibrate_batch_norm(plain, _faces(4))
  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_ALSTM)
  with pytest.raises(ConfigError, match="uint8 faces"):
    recalibrate.recalibrate_batch_norm(model, preprocess(_faces(4)))
  with pytest.raises(ConfigError, match="uint8 faces"):
    recalibrate.recalibrate_batch_norm(model, _faces(0))


def test_a_load_model_pair_a_ferdata_or_a_fractional_batch_size_is_named():
  from ferjax.data import FerData
  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_ALSTM)
  # Before: AttributeError: 'tuple' object has no attribute 'eval'.
  with pytest.raises(ConfigError, match=r"got tuple; load_model returns \(model, meta\): unpack"):
    recalibrate.recalibrate_batch_norm((model, {}), _faces(4))
  data = FerData(images=_faces(4), labels=np.zeros(4, np.int32), splits=["Training"] * 4,
                 rows=np.arange(4))
  # Before: "needs uint8 faces (N, H, W, 1), N > 0; got object ()".
  with pytest.raises(ConfigError, match=r"takes the faces, not a FerData: pass its images, e\.g\. "
                                        r"data.split\('Training'\).images"):
    recalibrate.recalibrate_batch_norm(model, data)
  # Before: batch_size=2.5 passed the check and failed as a TypeError from a slice.
  with pytest.raises(ConfigError, match="batch_size must be a whole number of at least 1, got 2.5"):
    recalibrate.recalibrate_batch_norm(model, data.images, batch_size=2.5)


def test_which_models_have_batch_norm():
  assert recalibrate.model_has_batch_norm("acnn_alstm", TINY_ALSTM)
  assert recalibrate.model_has_batch_norm("vgg_alstm")
  assert not recalibrate.model_has_batch_norm("dnn")
  assert not recalibrate.model_has_batch_norm("cnn_lstm", {"batch_norm": False})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  rows = fer_rows(64, usages=("Training",)) + fer_rows(20, usages=("PublicTest",)) + \
      fer_rows(21, usages=("PrivateTest",))
  csv = write_csv(tmp_path_factory.mktemp("data") / "fer2013.csv", rows)
  data = load_fer2013(csv, cache=False)
  workdir = str(tmp_path_factory.mktemp("runs") / "run")
  config = TrainConfig(model="acnn_alstm", model_overrides=TINY_ALSTM, epochs=1, batch_size=16,
                       eval_batch_size=16, learning_rate=3e-3)
  train_lib.train_and_evaluate(config, workdir, data=data)
  return workdir, data, csv


def test_recalibrate_run_writes_a_run_folder_that_loads_like_a_workdir(tiny_run, tmp_path):
  workdir, data, _ = tiny_run
  output = str(tmp_path / "recalibrated")
  results = recalibrate.recalibrate_run(workdir, output, data=data, batch_size=16,
                                        eval_batch_size=16)
  assert sorted(os.listdir(output)) == ["checkpoints", "results.json"]
  with open(os.path.join(output, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  source = json.load(open(os.path.join(workdir, "results.json")))
  r = results["batch_norm_recalibration"]
  assert (r["faces"], r["batch_size"], r["split"], r["step"]) == (64, 16, "Training",
                                                                   source["best_step"])
  assert results["epochs_trained"] == source["epochs_trained"]
  assert results["test_tta_none"]["num_examples"] == 21
  model, meta = checkpoint_lib.load_model(output)
  original, _ = checkpoint_lib.load_model(workdir)
  # The saved model is the recalibrated one: recomputing again gives the same statistics.
  again = recalibrate.recalibrate_batch_norm(original, data.split("Training").images,
                                             batch_size=16, seed=0)
  for (m0, v0), (m1, v1) in zip(_statistics(again), _statistics(model)):
    np.testing.assert_allclose(m0, m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v0, v1, rtol=1e-5, atol=1e-6)
  assert meta["batch_norm_recalibration"]["source"] == workdir
  from ferjax.evaluate import evaluate_checkpoint
  m = evaluate_checkpoint(output, data=data, batch_size=16, output_dir=str(tmp_path / "eval"))
  assert m["accuracy"] == pytest.approx(results["test_tta_none"]["accuracy"])
  # An existing output is refused and left as it was.
  with pytest.raises(CheckpointError, match="already exists"):
    recalibrate.recalibrate_run(workdir, output, data=data)
  assert sorted(os.listdir(output)) == ["checkpoints", "results.json"]


def test_a_failed_recalibration_leaves_no_output(tiny_run, tmp_path, monkeypatch):
  workdir, data, _ = tiny_run
  output = str(tmp_path / "recalibrated")

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint_lib.CheckpointStore, "save", full_disk)
  with pytest.raises(OSError, match="No space left"):
    recalibrate.recalibrate_run(workdir, output, data=data, batch_size=16, eval_batch_size=16)
  assert os.listdir(tmp_path) == []


def test_the_entrypoint_prints_before_and_after_and_refuses_a_model_without_batch_norm(
    tiny_run, tmp_path):
  workdir, _, csv = tiny_run
  output = str(tmp_path / "out")
  env = {**os.environ, "FERJAX_CACHE_DIR": str(tmp_path / "cache")}
  r = subprocess.run([sys.executable, "-m", "experiments.recalibrate_bn", f"--workdir={workdir}",
                      f"--output={output}", f"--data={csv}", "--batch_size=16"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("acnn_alstm step ") and "PublicTest accuracy" in lines[0]
  assert "recalibrated on 64 Training faces" in lines[0]
  assert lines[1].startswith("PrivateTest: ") and lines[2] == f"wrote {output}"
  assert os.path.isdir(os.path.join(output, "checkpoints"))
  # A run folder holding a dnn (untrained: the refusal reads only which model it is).
  dnn = str(tmp_path / "dnn")
  _, meta = checkpoint_lib.load_model(workdir)
  checkpoint_lib.save_inference_checkpoint(
      create_model("dnn", num_classes=7, rngs=nnx.Rngs(0)), dnn,
      {**meta, "model": "dnn", "config": {**meta["config"], "model": "dnn", "model_overrides": {}}})
  assert checkpoint_lib.load_model(dnn)[1]["model"] == "dnn"
  r = subprocess.run([sys.executable, "-m", "experiments.recalibrate_bn", f"--workdir={dnn}",
                      f"--output={tmp_path / 'dnn-out'}", f"--data={csv}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f"error: {dnn}: its dnn model has no BatchNorm layer; there is nothing to recalibrate"]
  assert not os.path.exists(tmp_path / "dnn-out")
