"""What every benchmark records beside its figures: when, where, under what load, which versions."""

import contextlib
import os
import platform
import time


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (the platform's guess elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def environment(**versions: str) -> dict:
  """Date, load average, machine, Python, JAX/Flax/NumPy and any ``versions`` given.

  A figure measured under load (another process on the CPU) reads very
  differently, so the 1/5/15-minute load averages go with every result.
  """
  import flax
  import jax
  import numpy as np

  from ferjax import hostmem

  return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(),
          "machine": f"{cpu_model()}, {os.cpu_count()} cores",
          "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "device": str(jax.devices()[0]),
          "retain_freed_memory": hostmem.retaining(), **versions}


_VIDEO_EXTENSIONS = (".avi", ".gif", ".mkv", ".mov", ".mp4", ".webm")


def clips(sources):
  """The video files named by ``sources``: files as given, folders' videos by name."""
  for source in sources:
    if os.path.isdir(source):
      yield from sorted(os.path.join(source, name) for name in os.listdir(source)
                        if name.lower().endswith(_VIDEO_EXTENSIONS))
    else:
      yield source


def fit(text: str, width: int) -> str:
  """``text`` cut to ``width`` characters in the middle ("…"), so both ends stay.

  A table column of model paths or clip names keeps what tells rows apart: the
  model and the checkpoint step, a file's start and its extension.
  """
  if len(text) <= width:
    return text
  head = width // 2
  return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def write_results(results: dict, path: str) -> None:
  """Adds the load average after the run, writes the JSON and says where."""
  import json

  results["load_average_after"] = os.getloadavg()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"load average {results['load_average'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after; wrote {path}")


@contextlib.contextmanager
def unrolled_scans():
  """Makes every ``lax.scan`` traced inside fully unrolled.

  XLA's cost analysis counts a while loop's body once, not once per
  iteration (checked on jax 0.10.2: a 10-step scan of a matmul reports the
  FLOPs of one matmul), so the LSTM's 36 steps would count as 1. ferjax's
  layers look ``jax.lax.scan`` up at call time, so this reaches them. The
  unroll is forced over any the caller passes (the LSTM's forward loop passes
  its own ``unroll=1``; a default in a ``functools.partial`` would lose to it
  and leave that loop counted once, as `benchmarks.train_throughput` did until
  2026-11-27).
  """
  import jax

  original = jax.lax.scan

  def unrolled(*args, **kwargs):
    return original(*args, **{**kwargs, "unroll": True})

  jax.lax.scan = unrolled
  try:
    yield
  finally:
    jax.lax.scan = original
