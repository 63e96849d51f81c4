r"""Times FER2013 loading: the first parse and the cached load, and batch feeding.

  python -m benchmarks.data_loading --data=$FER2013_PATH

Writes benchmarks/results/data_loading.json and prints a table.
"""

import json
import os
import platform
import statistics
import tempfile
import time

from absl import app, flags

from ferjax import cli
from ferjax import data as data_lib
from ferjax.input_pipeline import TrainBatches

_DATA = flags.DEFINE_string("data", os.environ.get("FER2013_PATH"), "fer2013.csv(.gz).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/data_loading.json", "JSON output.")


@cli.exit_on_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _DATA.value:
    raise app.UsageError("pass --data or set FER2013_PATH")
  parse, cached = [], []
  with tempfile.TemporaryDirectory() as cache_dir:
    for _ in range(_REPEATS.value):
      for f in os.listdir(cache_dir):
        os.remove(os.path.join(cache_dir, f))
      t = time.perf_counter()
      data = data_lib.load_fer2013(_DATA.value, cache_dir=cache_dir)  # Parses and writes cache.
      parse.append(time.perf_counter() - t)
      t = time.perf_counter()
      data_lib.load_fer2013(_DATA.value, cache_dir=cache_dir)
      cached.append(time.perf_counter() - t)
  train = data.split("Training")
  batches = TrainBatches(train.images, train.labels, batch_size=64, seed=0)
  batches.batch(0)
  t = time.perf_counter()
  n = 2000
  for step in range(n):
    batches.batch(step)
  per_batch = (time.perf_counter() - t) / n
  result = {
      "date": time.strftime("%Y-%m-%d"),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "file": os.path.basename(_DATA.value),
      "rows": len(data),
      "first_parse_s": {"median": statistics.median(parse), "all": parse},
      "cached_load_s": {"median": statistics.median(cached), "all": cached},
      "batch64_assembly_ms": per_batch * 1e3,
      "batches_per_s": 1 / per_batch,
  }
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{'what':<34}{'seconds':>10}")
  print(f"{'first parse (parse + cache write)':<34}{result['first_parse_s']['median']:>10.3f}")
  print(f"{'cached load':<34}{result['cached_load_s']['median']:>10.3f}")
  print(f"{'one batch of 64 (host gather)':<34}{per_batch:>10.6f}  ({1 / per_batch:,.0f} batches/s)")


if __name__ == "__main__":
  cli.run(main)
