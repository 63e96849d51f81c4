"""ferjax's XLA:CPU flag default: applied before JAX starts, never over the user's choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = "import ferjax, os; print(os.environ.get('XLA_FLAGS'))"


def _flags(code=SHOW, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FERJAX_KEEP_XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": ROOT, **env},
                     capture_output=True, text=True, check=True)
  return r.stdout.strip()


YNN = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
LOOPS = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=2000000"


def test_defaults_are_added_and_user_flags_kept():
  assert _flags() == f"{YNN} {LOOPS}"
  assert _flags(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
      f"--xla_force_host_platform_device_count=2 {YNN} {LOOPS}")


def test_users_choice_and_opt_out_win():
  own = "--xla_cpu_experimental_ynn_fusion_type="
  assert _flags(XLA_FLAGS=own) == f"{own} {LOOPS}"
  own_extra = "--xla_backend_extra_options=xla_cpu_enable_fast_min_max=true"
  assert _flags(XLA_FLAGS=own_extra) == f"{own_extra} {YNN}"
  assert _flags(XLA_FLAGS=f"{own} {own_extra}") == f"{own} {own_extra}"
  assert _flags(FERJAX_KEEP_XLA_FLAGS="1") == "None"


def test_a_batch_of_one_runs_the_lstm_loop_as_one_kernel():
  """The loop default takes effect: at batch 1 XLA compiles the recurrence whole."""
  code = textwrap.dedent("""
      import ferjax, jax, jax.numpy as jnp
      from ferjax.models.layers import lstm_recurrence
      w = jnp.zeros((128, 512))
      for b in (1, 8):
        hlo = jax.jit(lstm_recurrence).lower(jnp.zeros((36, b, 512)), w).compile().as_text()
        print(b, 'xla_cpu_small_call' in hlo)
  """)
  assert _flags(code).splitlines() == ["1 True", "8 False"]
  assert _flags(code, FERJAX_KEEP_XLA_FLAGS="1").splitlines() == ["1 False", "8 False"]


def test_nothing_changes_once_jax_has_started():
  code = "import jax; jax.devices(); " + SHOW
  assert _flags(code) == "None"


def test_public_names_resolve_lazily():
  code = ("import sys, ferjax; assert 'jax' not in sys.modules; "
          "print(all(callable(getattr(ferjax, n)) for n in ferjax.__all__ if n != '__version__'))")
  assert _flags(code) == "True"
  # Before: dir(ferjax), which tab completion reads, lacked every lazy name (Predictor, ...).
  code = "import sys, ferjax; print(set(ferjax.__all__) <= set(dir(ferjax)), 'jax' in sys.modules)"
  assert _flags(code) == "True False"
