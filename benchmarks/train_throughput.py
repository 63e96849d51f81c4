r"""Training throughput of ferjax's step against the same models and step in PyTorch.

  python -m benchmarks.train_throughput                       # all models
  python -m benchmarks.train_throughput --models=acnn_alstm --rounds=2 --steps=3
  python -m benchmarks.train_throughput --notorch             # ferjax alone

For each model, times ``Trainer.train_step`` (uint8 batch → preprocess,
augment, forward, backward, AdamW) and ``torch_models.TrainStep`` (the same
work in PyTorch) on one fixed batch, in interleaved rounds, and reports median
images/s, their ratio, and JAX's achieved GFLOP/s against two estimates of the
CPU's fp32 peak. The comparison needs the ``bench`` extra (PyTorch);
``--notorch`` times ferjax's step alone (images/s, GFLOP/s, % of peak) without
it. Writes benchmarks/results/train_throughput.json and prints a table.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common
from ferjax import cli
from ferjax import hostmem
from ferjax import parallel
from ferjax.augment import AugmentConfig
from ferjax.config import default_config as _default_config
from ferjax.errors import ConfigError
from ferjax.models import model_names
from ferjax.models.summary import count_params
from ferjax.train import Trainer, build_model


def default_config(name):
  """The model's default config, with random erasing kept off on both sides.

  (The registry turns it on for no model today; the PyTorch reference has no
  counterpart.)
  """
  return _default_config(name, augment=AugmentConfig())


try:  # The bench extra; without it only --notorch runs.
  import torch

  from benchmarks import torch_models
except ModuleNotFoundError as e:
  if e.name != "torch":
    raise
  torch = torch_models = None


_MODELS = flags.DEFINE_list("models", list(model_names()), "Models to time.")
_TORCH = flags.DEFINE_boolean(
    "torch", True, "Time the PyTorch reference beside ferjax (needs the bench extra); "
    "--notorch times ferjax alone.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per training step.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per framework, interleaved.",
                               lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per timed round.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per framework before the rounds.",
                               lower_bound=1)
_MEMORY_FORMAT = flags.DEFINE_enum(
    "torch_memory_format", "channels_last", ["channels_last", "contiguous"],
    "PyTorch tensor layout (channels_last was the faster in a paired comparison on the "
    "2-core Zen 4 VM, taken under load).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "PyTorch intra-op threads; 0 means os.cpu_count().", lower_bound=0)
_CLOCK_MHZ = flags.DEFINE_float(
    "clock_mhz", 0.0, "Core clock for the nominal peak; 0 reads lscpu, else /proc/cpuinfo "
    "(a VM may report its base clock while the host boosts above it).", lower_bound=0.0)
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["2048", "4096"],
                                "Square f32 matmul sizes for the measured peak.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/train_throughput.json", "JSON output.")

# Zen 4 runs AVX-512 on two 256-bit FMA pipes: 2 x 8 fp32 FMAs = 32 FLOP per cycle.
_FP32_FLOP_PER_CYCLE = 32
_TRAIN_EXAMPLES = 28_709  # FER2013 Training: sets steps_per_epoch, hence the warm-up length.


def _cost_flops(stage) -> float:
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device.
    cost = cost[0]
  return float(cost["flops"])


def _cpu_info() -> dict:
  """Model name (lscpu), physical cores, logical CPUs, and the clock /proc/cpuinfo reports.

  ``cores`` counts physical cores (lscpu's threads per core divided out), since
  SMT siblings share one core's FMA pipes; without lscpu it is the logical count.
  """
  info = {"model_name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "logical_cpus": os.cpu_count()}
  with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in lscpu.splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "Model name":
        info["model_name"] = value.strip()
      elif key.strip() == "CPU max MHz":
        info["lscpu_max_mhz"] = float(value)
      elif key.strip() == "Thread(s) per core":
        info["cores"] = max(1, (os.cpu_count() or 1) // int(value))
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    if mhz:
      info["proc_cpuinfo_mhz"] = max(mhz)
  return info


def _nominal_peak(cpu: dict, clock_mhz: float = 0.0) -> tuple[float | None, str]:
  """cores x clock x 32 FLOP/cycle; the clock is given, or lscpu's, or /proc/cpuinfo's."""
  if clock_mhz:
    mhz, source = clock_mhz, "--clock_mhz"
  elif "lscpu_max_mhz" in cpu:
    mhz, source = cpu["lscpu_max_mhz"], "lscpu 'CPU max MHz'"
  elif "proc_cpuinfo_mhz" in cpu:
    mhz, source = cpu["proc_cpuinfo_mhz"], "/proc/cpuinfo 'cpu MHz'"
  else:
    return None, "no clock found"
  gflops = cpu["cores"] * mhz * 1e-3 * _FP32_FLOP_PER_CYCLE
  how = f"{cpu['cores']} cores x {mhz:.0f} MHz ({source}) x {_FP32_FLOP_PER_CYCLE} FLOP/cycle"
  return gflops, how


def _matmul_peak(sizes, repeats: int = 5) -> dict[int, float]:
  """Best GFLOP/s of an n x n f32 matmul in JAX, for each n."""
  best = {}
  matmul = jax.jit(lambda a, b: a @ b)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      matmul(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    best[n] = 2 * n ** 3 / min(times) / 1e9
  return best


class _JaxRunner:
  """ferjax's Trainer on a fixed sharded batch."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, steps_per_epoch: int,
               total_steps: int):
    mesh = parallel.make_mesh()
    self.trainer = Trainer(default_config(name), 7, mesh, total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch, weights=np.ones(7, np.float32))
    self.batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
    self.metrics = self.trainer.zero_metrics()
    self.step = 0

  def flops(self) -> dict:
    """XLA's FLOPs of the compiled step, and the same with the LSTM loops counted per step."""
    trainer = self.trainer
    args = (trainer.rng_state, trainer.state, self.metrics, self.batch,
            jnp.asarray(self.step, jnp.int32))
    t = time.perf_counter()
    lowered = trainer._train_step_jit.lower(*args)
    compiled = lowered.compile()  # The jitted step reuses this compilation.
    compile_s = time.perf_counter() - t
    # Before XLA's optimisations both counts see the same program but for the
    # unrolling; their difference is the loop iterations the compiled count misses.
    with common.unrolled_scans():
      unrolled = jax.jit(lambda *a: trainer._train_step(*a)).lower(*args)
    missed = _cost_flops(unrolled) - _cost_flops(lowered)
    xla = _cost_flops(compiled)
    return {"compile_s": compile_s, "xla_flops": xla, "scan_iterations_flops": missed,
            "flops": xla + missed}

  def run(self, steps: int) -> None:
    trainer = self.trainer
    for _ in range(steps):
      trainer.state, self.metrics = trainer.train_step(trainer.state, self.metrics, self.batch,
                                                       jnp.asarray(self.step, jnp.int32))
      self.step += 1
    jax.block_until_ready((trainer.state, self.metrics))

  def mean_loss(self) -> float:
    m = jax.device_get(self.metrics)
    return float(m["loss"]) / max(float(m["count"]), 1.0)


class _TorchRunner:
  """torch_models.TrainStep on the same batch."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, steps_per_epoch: int,
               total_steps: int, memory_format: torch.memory_format):
    torch.manual_seed(0)
    self.model = torch_models.build(name)
    self.train_step = torch_models.TrainStep(self.model, default_config(name),
                                             total_steps=total_steps,
                                             steps_per_epoch=steps_per_epoch,
                                             memory_format=memory_format)
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # C = 1: NHWC and NCHW alike.
    self.labels = torch.from_numpy(labels.astype(np.int64))
    self.step = 0
    self.loss = math.nan

  def run(self, steps: int) -> None:
    for _ in range(steps):
      loss, _ = self.train_step(self.images, self.labels, self.step)
      self.step += 1
    self.loss = float(loss)


def _time_model(name: str, memory_format: torch.memory_format | None) -> dict:
  """Times ferjax's step and, unless ``memory_format`` is None, PyTorch's, interleaved."""
  b = _BATCH_SIZE.value
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, 48, 48, 1), dtype=np.uint8)
  labels = rng.integers(0, 7, (b,)).astype(np.int32)
  steps_per_epoch = -(-_TRAIN_EXAMPLES // b)
  total_steps = 50 * steps_per_epoch
  runners = {"jax": _JaxRunner(name, images, labels, steps_per_epoch, total_steps)}
  if memory_format is not None:
    runners["torch"] = _TorchRunner(name, images, labels, steps_per_epoch, total_steps,
                                    memory_format)
  flops = runners["jax"].flops()
  for runner in runners.values():
    runner.run(_WARMUP.value)
  rates = {fw: [] for fw in runners}
  for r in range(_ROUNDS.value):
    # Alternate which goes first so neither always follows the other's cache state.
    for fw in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
      t = time.perf_counter()
      runners[fw].run(_STEPS.value)
      rates[fw].append(_STEPS.value * b / (time.perf_counter() - t))
  jax_rate = statistics.median(rates["jax"])
  tx = runners.get("torch")
  torch_rate = statistics.median(rates["torch"]) if tx else None
  return {
      "params": count_params(nnx.eval_shape(lambda: build_model(default_config(name), 7))),
      "torch_trainable_params": torch_models.count_params(tx.model) if tx else None,
      "jax_images_per_s": jax_rate,
      "torch_images_per_s": torch_rate,
      "jax_over_torch": jax_rate / torch_rate if tx else None,
      "jax_rounds_images_per_s": rates["jax"],
      "torch_rounds_images_per_s": rates.get("torch"),
      "jax_compile_s": flops["compile_s"],
      "xla_flops_per_step": flops["xla_flops"],
      "scan_iterations_flops_per_step": flops["scan_iterations_flops"],
      "flops_per_step": flops["flops"],
      "jax_gflops_per_s": flops["flops"] / (b / jax_rate) / 1e9,
      # Sanity: both runs trained on finite losses.
      "jax_mean_loss": runners["jax"].mean_loss(),
      "torch_last_loss": tx.loss if tx else None,
  }


def _versions(with_torch: bool) -> dict:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "torch": torch.__version__ if with_torch else None,
          "jax_devices": [str(d) for d in jax.devices()],
          "torch_mkldnn": torch.backends.mkldnn.is_available() if with_torch else None}


@cli.exit_on_errors
def main(argv):
  hostmem.retain_freed_memory()  # As the entrypoints do; before JAX starts.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_MODELS.value) - set(model_names()))
  if unknown:
    raise app.UsageError(f"unknown models {unknown}; choose from {', '.join(model_names())}")
  peak_sizes = cli.number_list(_PEAK_SIZES, int, minimum=1)
  with_torch = _TORCH.value
  if with_torch and torch is None:
    raise ConfigError("PyTorch is not installed: install the bench extra (pip install -e "
                      "\".[bench]\"; benchmarks/README.md has the CPU-only wheel), or pass "
                      "--notorch to time ferjax alone")
  memory_format = None
  if with_torch:
    torch.set_num_threads(_TORCH_THREADS.value or os.cpu_count())
    memory_format = (torch.channels_last if _MEMORY_FORMAT.value == "channels_last"
                     else torch.contiguous_format)
  load_start = os.getloadavg()
  started = time.perf_counter()
  cpu = _cpu_info()
  nominal, nominal_how = _nominal_peak(cpu, _CLOCK_MHZ.value)
  matmul = _matmul_peak(peak_sizes)
  measured = max(matmul.values())
  results = {}
  for name in _MODELS.value:
    t = time.perf_counter()
    results[name] = r = _time_model(name, memory_format)
    r["model_wall_s"] = time.perf_counter() - t
    r["percent_of_nominal_peak"] = 100 * r["jax_gflops_per_s"] / nominal if nominal else None
    r["percent_of_matmul_peak"] = 100 * r["jax_gflops_per_s"] / measured
    print(f"{name}: jax {r['jax_images_per_s']:.0f} img/s"
          + (f", torch {r['torch_images_per_s']:.0f} img/s" if with_torch else ""), flush=True)
    gc.collect()  # Drop the previous model's trainer and buffers before the next.
  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
      "machine": {**cpu, "platform": platform.platform()},
      "versions": _versions(with_torch),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # ferjax's malloc settings (ferjax/hostmem.py), which apply to both frameworks here.
      "retain_freed_memory": hostmem.retaining(),
      # A start load well above 0 means other processes were using the CPU: loaded figures.
      "load_average_at_start": load_start,
      "load_average_at_end": os.getloadavg(),
      "wall_s": time.perf_counter() - started,
      "settings": {"batch_size": _BATCH_SIZE.value, "rounds": _ROUNDS.value,
                   "steps": _STEPS.value, "warmup": _WARMUP.value,
                   "torch": with_torch,
                   "torch_threads": torch.get_num_threads() if with_torch else None,
                   "torch_memory_format": _MEMORY_FORMAT.value if with_torch else None},
      "peak": {"nominal_gflops_per_s": nominal, "nominal_how": nominal_how,
               "matmul_gflops_per_s": {str(n): g for n, g in matmul.items()},
               "measured_gflops_per_s": measured},
      "flops_note": "flops_per_step = XLA's cost analysis of the compiled step "
                    "(xla_flops_per_step, which counts each lax.scan body once) + the LSTM "
                    "loop iterations it misses (scan_iterations_flops_per_step); "
                    "jax_gflops_per_s and the percentages use flops_per_step.",
      "models": results,
  }
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=2)
  _print_table(report)


def _print_table(report: dict) -> None:
  peak = report["peak"]
  nominal = peak["nominal_gflops_per_s"]
  print(f"\n{report['machine']['model_name']}, {report['machine']['cores']} cores; "
        f"load average at start {report['load_average_at_start'][0]:.2f}; "
        f"batch {report['settings']['batch_size']}, median of {report['settings']['rounds']} "
        f"rounds x {report['settings']['steps']} steps")
  print(f"fp32 peak: nominal {nominal or float('nan'):.0f} GFLOP/s ({peak['nominal_how']}); "
        f"measured (best JAX matmul) {peak['measured_gflops_per_s']:.0f} GFLOP/s")
  header = (f"{'model':<12}{'params':>10}{'JAX img/s':>11}{'torch img/s':>13}{'JAX/torch':>11}"
            f"{'XLA GFLOP':>11}{'GFLOP/step':>12}{'GFLOP/s':>9}{'% nominal':>11}{'% matmul':>10}")
  print(header)
  print("-" * len(header))
  for name, r in report["models"].items():
    pct_nominal = r["percent_of_nominal_peak"]
    torch_rate = "—" if r["torch_images_per_s"] is None else f"{r['torch_images_per_s']:.1f}"
    ratio = "—" if r["jax_over_torch"] is None else f"{r['jax_over_torch']:.2f}"
    print(f"{name:<12}{r['params']:>10,}{r['jax_images_per_s']:>11.1f}"
          f"{torch_rate:>13}"
          f"{ratio:>11}{r['xla_flops_per_step'] / 1e9:>11.2f}"
          f"{r['flops_per_step'] / 1e9:>12.2f}"
          f"{r['jax_gflops_per_s']:>9.1f}"
          f"{pct_nominal if pct_nominal is not None else float('nan'):>11.1f}"
          f"{r['percent_of_matmul_peak']:>10.1f}")
  print("XLA GFLOP: cost analysis of the compiled JAX step, which counts each lax.scan body "
        "once;\nGFLOP/step adds the LSTM's other iterations and is what GFLOP/s and the "
        "% columns use.")


if __name__ == "__main__":
  cli.run(main)
