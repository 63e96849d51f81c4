"""Shared fixtures: tiny FER2013-format files the tests write themselves."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

# Keep JAX on the CPU and quiet in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_XLA_CACHE: list[str] = []


def pytest_configure(config):
  """One JAX persistent compilation cache for the test session, deleted at the end.

  Many tests train the same tiny model; each Trainer jits its own functions, so each run
  compiled the same programs again (most of a tiny run's time on 2 cores). With the cache,
  a later run reads the identical executables back. Tracing is unaffected, so the tests
  that count traces still see recompiles. Set here, not through JAX_COMPILATION_CACHE_DIR,
  so the subprocesses the tests start keep their own cache settings. Under pytest-xdist
  the workers share the controller's folder (``pytest_configure_node``), so a program one
  worker compiled is read back by the other (an entry read while half-written fails to
  load, and JAX warns and compiles the program instead).
  """
  import jax
  shared = getattr(config, "workerinput", {}).get("ferjax_xla_cache")
  if shared is None:
    _XLA_CACHE.append(tempfile.mkdtemp(prefix="ferjax-test-xla-"))
  jax.config.update("jax_compilation_cache_dir", shared or _XLA_CACHE[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """pytest-xdist, on the controller: each worker gets the session's cache folder."""
  node.workerinput["ferjax_xla_cache"] = _XLA_CACHE[0]


def pytest_unconfigure(config):
  for path in _XLA_CACHE:  # Only the process that made the folder deletes it.
    shutil.rmtree(path, ignore_errors=True)


HEADER = "emotion,pixels,Usage"


def pixel_string(seed: int) -> str:
  values = np.random.default_rng(seed).integers(0, 256, 48 * 48)
  return " ".join(map(str, values))


def fer_rows(n: int, usages=("Training", "PublicTest", "PrivateTest")) -> list[str]:
  """``n`` valid CSV rows with emotion i % 7 and cycling Usage."""
  return [f"{i % 7},{pixel_string(i)},{usages[i % len(usages)]}" for i in range(n)]


def write_csv(path, rows, header=HEADER, newline="\n") -> str:
  with open(path, "w", newline="") as f:
    f.write(newline.join([header, *rows]) + newline)
  return str(path)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  d = tmp_path / "cache"
  monkeypatch.setenv("FERJAX_CACHE_DIR", str(d))
  return d


def _real_file(variable: str, what: str) -> str:
  """The real data file the environment variable names, or a skip saying why."""
  path = os.environ.get(variable)
  if not path or not os.path.exists(path):
    pytest.skip(f"{variable} is not set to the real {what}; real-data test skipped")
  return path


@pytest.fixture
def fer2013_path():
  return _real_file("FER2013_PATH", "fer2013.csv(.gz)")


@pytest.fixture
def ferplus_path():
  return _real_file("FERPLUS_PATH", "fer2013new.csv")
