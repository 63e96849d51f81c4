r"""Start-up time of the realtime script, with and without XLA's compilation cache.

  python -m benchmarks.startup --repeats=3

Runs ``python -m experiments.realtime --source=demo --no_display`` (the shipped
weights on the 65-frame demo clip) as a user would, as a new process each time,
and times the whole command. Each repeat runs it three ways, one after the
other: with the compilation cache turned off (``JAX_ENABLE_COMPILATION_CACHE=false``),
with an empty cache (the first start after installing, which fills it) and with
that cache filled (every later start). Besides the wall time it reads the
script's own report of how long compiling predict for its batch sizes took.
Every run gets its own ferjax cache folder, so no run reads another's data
cache either. Writes benchmarks/results/startup.json.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.common import environment, write_results
from ferjax import cli
from ferjax.errors import FerjaxError

_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds of the three ways.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/startup.json", "JSON output.")

_COMMAND = [sys.executable, "-m", "experiments.realtime", "--source=demo", "--no_display"]
_TIMEOUT_S = 600
_COMPILED = re.compile(r"compiled for batch sizes .* in ([0-9.]+) s")


def _start(cache_dir: str, cache_on: bool) -> dict:
  env = {**os.environ, "FERJAX_CACHE_DIR": cache_dir}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if not cache_on:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  start = time.perf_counter()
  command = " ".join(_COMMAND[1:])
  try:
    r = subprocess.run(_COMMAND, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise FerjaxError(f"{command} did not finish in {_TIMEOUT_S} s") from None
  wall = time.perf_counter() - start
  if r.returncode:
    tail = "\n".join(r.stderr.strip().splitlines()[-5:])
    raise FerjaxError(f"{command} failed with exit status {r.returncode}:\n{tail}")
  compiled = _COMPILED.search(r.stdout + r.stderr)
  return {"wall_s": round(wall, 3), "compile_s": float(compiled.group(1)) if compiled else None}


@cli.exit_on_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_libraries()  # Library notes would land inside the table.
  results = {"command": " ".join(_COMMAND[1:]), **environment(), "runs": []}
  # The timed command keeps freed memory itself (ferjax/hostmem.py) unless this opts out;
  # this process's own setting, which environment() records, says nothing about it.
  results["retain_freed_memory"] = (not os.environ.get("FERJAX_KEEP_MALLOC")
                                    and sys.platform.startswith("linux"))
  ways = ("cache off", "empty cache", "filled cache")
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(_REPEATS.value):
      off = _start(os.path.join(tmp, f"off{i}"), cache_on=False)
      cold = _start(os.path.join(tmp, f"on{i}"), cache_on=True)
      warm = _start(os.path.join(tmp, f"on{i}"), cache_on=True)
      for way, run in zip(ways, (off, cold, warm)):
        results["runs"].append({"way": way, **run})
      print(f"round {i + 1}: " + ", ".join(f"{w} {r['wall_s']:.2f} s" for w, r in
                                            zip(ways, (off, cold, warm))), flush=True)
  print(f"\n{'start':<14} {'wall s (median)':>16} {'predict compile s (median)':>27}")
  for way in ways:
    runs = [r for r in results["runs"] if r["way"] == way]
    wall = statistics.median(r["wall_s"] for r in runs)
    compiles = [r["compile_s"] for r in runs if r["compile_s"] is not None]
    compile_s = statistics.median(compiles) if compiles else float("nan")
    results[way.replace(" ", "_")] = {"median_wall_s": wall, "median_compile_s": compile_s}
    print(f"{way:<14} {wall:>16.2f} {compile_s:>27.2f}")
  write_results(results, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
