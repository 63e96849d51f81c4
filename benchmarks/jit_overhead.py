r"""Per-call cost of ``nnx.jit`` against the functional split/merge + ``jax.jit`` form.

  python -m benchmarks.jit_overhead --models=acnn_alstm,dnn

For the train step (batch 64, AdamW, augmentation) and for predict (batch 1
and 64) it times both forms on the same model and prints median milliseconds
per call. Writes benchmarks/results/jit_overhead.json.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ferjax import cli
from ferjax import hostmem
from ferjax.augment import augment
from ferjax.config import default_config
from ferjax.evaluate import make_predict_fn, predict_probs
from ferjax.preprocess import preprocess
from ferjax.train import build_model, loss_fn, make_optimizer

_MODELS = flags.DEFINE_list("models", ["acnn_alstm", "dnn"], "Models to time.")
_CALLS = flags.DEFINE_integer("calls", 30, "Timed calls per measurement.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/jit_overhead.json", "JSON output.")


def _time(fn, calls):
  jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def _nnx_train_step(config):
  @nnx.jit
  def step(model, optimizer, images, labels, key):
    aug_key, dropout_key = jax.random.split(key)
    nnx.reseed(model, dropout=dropout_key)
    x = augment(aug_key, preprocess(images), config.augment)
    weights = jnp.ones((7,), jnp.float32)

    def loss_of(model):
      return loss_fn(model(x), labels, weights, config.label_smoothing)

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return loss
  return step


def _time_model(name, rng):
  from ferjax import parallel
  from ferjax.train import Trainer

  config = default_config(name)
  images = rng.integers(0, 256, (64, 48, 48, 1), dtype=np.uint8)
  labels = rng.integers(0, 7, 64).astype(np.int32)
  # nnx.jit form.
  model = build_model(config, 7)
  optimizer = nnx.Optimizer(model, make_optimizer(config, 1000, 100), wrt=nnx.Param)
  step = _nnx_train_step(config)
  key = jax.random.key(0)
  ji, jl = jnp.asarray(images), jnp.asarray(labels)
  t_nnx = _time(lambda: step(model, optimizer, ji, jl, key), _CALLS.value)
  # Functional form: the library's Trainer.
  mesh = parallel.make_mesh()
  trainer = Trainer(config, 7, mesh, total_steps=1000, steps_per_epoch=100,
                    weights=np.ones(7, np.float32))
  batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
  metrics = trainer.zero_metrics()

  def functional():
    trainer.state, m = trainer.train_step(trainer.state, metrics, batch, jnp.asarray(0))
    return m

  t_fun = _time(functional, _CALLS.value)
  row = {"train_step_b64": {"nnx_jit_ms": t_nnx, "functional_ms": t_fun}}
  print(f"{name:<12}{'train step, batch 64':<22}{t_nnx:>12.2f}{t_fun:>15.2f}{t_nnx / t_fun:>8.2f}")
  eval_model = build_model(config, 7)
  eval_model.eval()
  predict_nnx = nnx.jit(lambda m, x: predict_probs(m, x))
  predict_fun = make_predict_fn(eval_model)
  for b in (1, 64):
    x = jnp.asarray(images[:b])
    tn = _time(lambda x=x: predict_nnx(eval_model, x), _CALLS.value * 4)
    tf = _time(lambda x=x: predict_fun(x), _CALLS.value * 4)
    row[f"predict_b{b}"] = {"nnx_jit_ms": tn, "functional_ms": tf}
    print(f"{name:<12}{f'predict, batch {b}':<22}{tn:>12.3f}{tf:>15.3f}{tn / tf:>8.2f}")
  return row


@cli.exit_on_errors
def main(argv):
  hostmem.retain_freed_memory()  # As the entrypoints do; before JAX starts.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_libraries()  # Library notes would land inside the table.
  rng = np.random.default_rng(0)
  results = {"date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(), "models": {}}
  print(f"{'model':<12}{'what':<22}{'nnx.jit ms':>12}{'functional ms':>15}{'ratio':>8}")
  for name in _MODELS.value:
    results["models"][name] = _time_model(name, rng)
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
