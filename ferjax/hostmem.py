"""Host memory: let XLA:CPU reuse its freed buffers instead of faulting in fresh pages.

Each call of a compiled computation allocates its temporary buffer (about
120 MB for an ``acnn_alstm`` training step at batch 64) and Eigen's
convolutions allocate scratch blocks, all with ``malloc`` from XLA's worker
threads. glibc serves blocks that large with a fresh ``mmap`` and unmaps them
on ``free``, so every training step touches about 29,000 new pages and spends
some 50 ms of kernel time zeroing them (BUILD_NOTES.md, Speed).
:func:`retain_freed_memory` switches glibc to one heap for all threads, no
``mmap`` for large blocks and no trimming: a freed block stays in the heap and
the next step reuses it.

The price: the process keeps its peak heap until it exits, and all threads
share one malloc arena. Entrypoints call it first thing;
``FERJAX_KEEP_MALLOC=1`` leaves malloc alone. It must run before JAX starts its
backend: threads that have allocated already keep their own arenas.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int.

_applied: bool | None = None


def jax_started() -> bool:
  """Whether JAX has started a backend (so XLA flags and malloc settings come too late)."""
  jax_module = sys.modules.get("jax")
  if jax_module is None:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 - private API moved: assume the worst.
    return True


def retain_freed_memory() -> bool:
  """Keeps freed heap memory for reuse (glibc on Linux only); idempotent.

  Returns:
    True when glibc's settings were changed by this or an earlier call; False
    when ``FERJAX_KEEP_MALLOC`` is set, the C library is not glibc, or JAX's
    backend had already started (then nothing is changed, with a warning).
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("FERJAX_KEEP_MALLOC") or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol).
  except (OSError, AttributeError):
    return False
  if jax_started():
    log.warning("JAX started before ferjax.hostmem.retain_freed_memory(): malloc left alone")
    return False
  ok = all(libc.mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  _applied = ok
  return ok


def retaining() -> bool:
  """Whether :func:`retain_freed_memory` has changed glibc's settings in this process."""
  return bool(_applied)
