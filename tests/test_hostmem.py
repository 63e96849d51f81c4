"""ferjax.hostmem: freed XLA buffers are reused instead of faulting in fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted convolution gradient whose temporaries (tens of MB) XLA allocates and frees on
# every call; prints whether malloc was tuned and the median call's page faults after warm-up.
_PROBE = """
import os, resource, sys
from ferjax import hostmem
applied = hostmem.retain_freed_memory() if sys.argv[1] == "tune" else None
import jax, jax.numpy as jnp
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
loss = lambda k, x: jnp.sum(jnp.square(conv(jax.nn.relu(conv(x, k)), k)))
f = jax.jit(jax.grad(loss))
x = jnp.ones((64, 48, 48, 16), jnp.float32)
k = jnp.full((3, 3, 16, 16), 0.01, jnp.float32)
for _ in range(10):  # Until the heap has grown to the peak a call needs.
  f(k, x).block_until_ready()
if sys.argv[1] == "late":  # JAX has started: too late to change anything.
  applied = hostmem.retain_freed_memory()
faults = []
for _ in range(11):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(k, x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
assert hostmem.retaining() == (applied is True)
print(applied, sorted(faults)[5])  # The median call (the heap may still grow now and then).
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
  done = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, **env})
  assert done.returncode == 0, done.stderr[-2000:]
  applied, faults = done.stdout.split()[-2:]
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
  env = {"FERJAX_KEEP_MALLOC": ""}
  applied, tuned = _probe("tune", **env)
  assert applied == "True"
  _, plain = _probe("plain", **env)
  # Freshly mapped temporaries fault in every page (~14,000 measured); reused ones none.
  assert plain > 5_000, plain
  assert tuned < plain / 20, (tuned, plain)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_opt_out_and_too_late_leave_malloc_alone():
  applied, faults = _probe("tune", FERJAX_KEEP_MALLOC="1")
  assert applied == "False" and faults > 5_000
  applied, faults = _probe("late", FERJAX_KEEP_MALLOC="")
  assert applied == "False" and faults > 5_000
