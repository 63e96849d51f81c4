"""Shared fixtures: tiny FER2013-format files the tests write themselves."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Keep JAX on the CPU and quiet in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


@pytest.fixture
def fer2013_path():
  path = os.environ.get("FER2013_PATH")
  if not path or not os.path.exists(path):
    pytest.skip("FER2013_PATH is not set to the real fer2013.csv(.gz); real-data test skipped")
  return path


@pytest.fixture
def ferplus_path():
  path = os.environ.get("FERPLUS_PATH")
  if not path or not os.path.exists(path):
    pytest.skip("FERPLUS_PATH is not set to the real fer2013new.csv; real-data test skipped")
  return path
