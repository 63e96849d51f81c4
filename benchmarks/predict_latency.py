r"""Latency of ``Predictor.predict_faces`` for one face, and faces per second at batch 64.

  python -m benchmarks.predict_latency                         # the shipped weights
  python -m benchmarks.predict_latency --workdir=runs/acnn_alstm
  python -m benchmarks.predict_latency --models=acnn_alstm,vgg_alstm,dnn

With ``--models`` each registered model is freshly initialised (speed does not
depend on the weights). Per model it times, after warm-up, many calls of:

* ``predict_faces`` with one face (the default predictor: batch sizes 1, 2, 4, 8);
* the same work without the Python wrapper: the jitted function on a
  ready-padded host batch plus the fetch of the result ("raw jit");
* the jitted function on a batch already on the device, waiting for the result
  ("device only": dispatch and compute, no transfers);
* ``predict_faces`` with 64 faces on a predictor compiled for batch 64 only.

It prints median and p90 milliseconds per call and faces per second, and writes
benchmarks/results/predict_latency.json (with the load average, date, machine
and versions: figures from a busy machine are not comparable).
"""

import os
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.common import environment, fit, write_results
from ferjax import cli
from ferjax import hostmem
from ferjax import checkpoint as checkpoint_lib
from ferjax.data import FER2013_CLASSES
from ferjax.faces import FACE_SIZE
from ferjax.inference import DEFAULT_WEIGHTS, Predictor
from ferjax.models import create_model, model_names

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir. Default: the "
                               "shipped weights in ferjax/weights/default when present, "
                               "else a fresh acnn_alstm.")
_WHICH = flags.DEFINE_string("which", "best", "best, latest or a step number.")
flags.DEFINE_alias("checkpoint", "workdir")  # The earlier name of --workdir here.
_MODELS = flags.DEFINE_list("models", [], f"Freshly initialised models to time instead of a "
                            f"checkpoint; any of {', '.join(model_names())}.")
_CALLS = flags.DEFINE_integer("calls", 500, "Timed calls per batch-1 measurement.")
_BIG_CALLS = flags.DEFINE_integer("big_calls", 50, "Timed calls per batch-64 measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls before each measurement (after "
                               "compiling).")
_BIG_BATCH = flags.DEFINE_integer("big_batch", 64, "Batch size of the throughput measurement.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/predict_latency.json", "JSON output.")


def _time_calls(fn, calls: int, warmup: int) -> dict:
  for _ in range(warmup):
    fn()
  times = np.empty(calls)
  for i in range(calls):
    start = time.perf_counter()
    fn()
    times[i] = time.perf_counter() - start
  return {"median_ms": float(np.median(times) * 1e3),
          "p90_ms": float(np.percentile(times, 90) * 1e3), "calls": calls}


def time_model(model: nnx.Module, class_names, rng: np.random.Generator) -> dict:
  """The four measurements of the module docstring for one model."""
  # Two predictors over the same weights: the pipeline's default (batch sizes 1, 2, 4, 8)
  # and one compiled for the big batch only.
  small = Predictor.from_model(model, class_names)
  big = Predictor.from_model(model, class_names, max_faces=_BIG_BATCH.value,
                             batch_sizes=(_BIG_BATCH.value,))
  compile_s = small.warmup() + big.warmup()
  face_1x48x48 = rng.integers(0, 256, (1, FACE_SIZE, FACE_SIZE), dtype=np.uint8)
  faces_Bx48x48 = rng.integers(0, 256, (_BIG_BATCH.value, FACE_SIZE, FACE_SIZE), dtype=np.uint8)
  # The raw forms reach into the predictor on purpose: they are what predict_faces wraps.
  host_1x48x48x1 = face_1x48x48[..., None]
  device_1x48x48x1 = jax.device_put(host_1x48x48x1)
  row = {"compile_s": compile_s}
  row["predict_faces_b1"] = _time_calls(lambda: small.predict_faces(face_1x48x48),
                                        _CALLS.value, _WARMUP.value)
  row["raw_jit_b1"] = _time_calls(
      lambda: jax.device_get(small._predict(host_1x48x48x1)[0]),
      _CALLS.value, _WARMUP.value)
  row["device_only_b1"] = _time_calls(
      lambda: jax.block_until_ready(small._predict(device_1x48x48x1)[0]),
      _CALLS.value, _WARMUP.value)
  big_row = _time_calls(lambda: big.predict_faces(faces_Bx48x48), _BIG_CALLS.value,
                        max(1, _WARMUP.value // 4))
  big_row["faces_per_s"] = _BIG_BATCH.value / (big_row["median_ms"] / 1e3)
  row[f"predict_faces_b{_BIG_BATCH.value}"] = big_row
  row["predict_faces_b1"]["faces_per_s"] = 1e3 / row["predict_faces_b1"]["median_ms"]
  return row


def _targets():
  """(label, model, class names) to time, from the flags."""
  if _MODELS.value:
    yield from _fresh(_MODELS.value)
    return
  path = _WORKDIR.value
  if path is None and os.path.isdir(os.path.join(DEFAULT_WEIGHTS, "checkpoints")):
    path = DEFAULT_WEIGHTS
  if path is None:
    print("no shipped weights in ferjax/weights/default: timing a fresh acnn_alstm")
    yield from _fresh(["acnn_alstm"])
    return
  model, meta = checkpoint_lib.load_model(path, _WHICH.value)
  yield f"{meta['model']} ({path}, step {meta.get('step')})", model, meta["class_names"]


def _fresh(names):
  for name in names:
    model = create_model(name, num_classes=len(FER2013_CLASSES),
                         rngs=nnx.Rngs(params=0, dropout=1))
    yield f"{name} (fresh init)", model, FER2013_CLASSES


@cli.exit_on_errors
def main(argv):
  hostmem.retain_freed_memory()  # As the entrypoints do; before JAX starts.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_libraries()  # Library notes would land inside the table.
  results = {**environment(), "settings": {
      "calls": _CALLS.value, "big_calls": _BIG_CALLS.value, "warmup": _WARMUP.value,
      "big_batch": _BIG_BATCH.value}, "models": {}}
  rng = np.random.default_rng(0)
  big = f"predict_faces_b{_BIG_BATCH.value}"
  targets = list(_targets())  # Loaded before the table, so its messages come first.
  print(f"{'model':<44}{'what':<26}{'median ms':>10}{'p90 ms':>9}{'faces/s':>10}")
  for label, model, class_names in targets:
    row = time_model(model, class_names, rng)
    results["models"][label] = row
    for key, what in (("predict_faces_b1", "predict_faces, 1 face"),
                      ("raw_jit_b1", "raw jit + fetch, batch 1"),
                      ("device_only_b1", "device only, batch 1"),
                      (big, f"predict_faces, batch {_BIG_BATCH.value}")):
      r = row[key]
      rate = f"{r['faces_per_s']:>10,.0f}" if "faces_per_s" in r else ""
      print(f"{fit(label, 43):<44}{what:<26}{r['median_ms']:>10.3f}{r['p90_ms']:>9.3f}{rate}")
  write_results(results, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
