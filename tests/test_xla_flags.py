"""ferjax's XLA:CPU flag default: applied before JAX starts, never over the user's choice."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = "import ferjax, os; print(os.environ.get('XLA_FLAGS'))"


def _flags(code=SHOW, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FERJAX_KEEP_XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": ROOT, **env},
                     capture_output=True, text=True, check=True)
  return r.stdout.strip()


def test_default_is_added_and_user_flags_kept():
  assert _flags() == "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
  assert _flags(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
      "--xla_force_host_platform_device_count=2 "
      "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce")


def test_users_choice_and_opt_out_win():
  own = "--xla_cpu_experimental_ynn_fusion_type="
  assert _flags(XLA_FLAGS=own) == own
  assert _flags(FERJAX_KEEP_XLA_FLAGS="1") == "None"


def test_nothing_changes_once_jax_has_started():
  code = "import jax; jax.devices(); " + SHOW
  assert _flags(code) == "None"


def test_public_names_resolve_lazily():
  code = ("import sys, ferjax; assert 'jax' not in sys.modules; "
          "print(all(callable(getattr(ferjax, n)) for n in ferjax.__all__ if n != '__version__'))")
  assert _flags(code) == "True"
