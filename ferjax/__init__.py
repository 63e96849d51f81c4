"""ferjax: facial expression recognition with JAX and Flax NNX."""

import os

__version__ = "0.1.0"

# Two XLA:CPU flag defaults, each measured on the project's 2-core Zen 4 machine
# (BUILD_NOTES.md, Speed):
# * XLA runs convolutions through YNNPACK by default; for the convolution shapes
#   of these models (3x3, 1-256 channels, 6-48 px) its backward passes are
#   slower than XLA's Eigen convolutions, while YNNPACK's dots and reductions
#   are faster. A training step got 1.2x faster.
# * XLA compiles a while loop into one kernel only when it touches under 1 kB;
#   otherwise every iteration dispatches each op separately. At batch 1 the
#   LSTM's 36-step loop (about 0.3 MB) spent about a quarter of its time there;
#   compiled whole, the recurrence takes about 0.06 ms less. Loops over larger
#   batches call YNNPACK and are left as they are.
# Only the CPU backend is touched, never a flag the user set, only on the jaxlib
# versions they were measured on, and nothing once JAX has started or when
# FERJAX_KEEP_XLA_FLAGS is set.
_XLA_DEFAULTS = (
    ("--xla_cpu_experimental_ynn_fusion_type", "individual_dot,reduce"),
    ("--xla_backend_extra_options", "xla_cpu_small_while_loop_byte_threshold=2000000"),
)


def _tune_xla_cpu() -> None:
  if os.environ.get("FERJAX_KEEP_XLA_FLAGS"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f"{name}={value}" for name, value in _XLA_DEFAULTS if name not in flags]
  if not missing:
    return
  try:
    from importlib.metadata import version
    major, minor = (int(p) for p in version("jaxlib").split(".")[:2])
  except Exception:  # noqa: BLE001 - no jaxlib metadata: leave XLA alone.
    return
  if (major, minor) < (0, 10) or (major, minor) >= (0, 13):
    return  # Flag values untested there; an unknown value would abort XLA.
  from ferjax.hostmem import jax_started
  if jax_started():
    return  # Too late: XLA read its flags already.
  os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


_tune_xla_cpu()

# Public names, imported on first use so that `import ferjax` stays fast (and
# the entrypoints' --help does not wait for JAX). The shared input transform is
# ferjax.preprocess.preprocess: its module's name would shadow it here.
_EXPORTS = {
    "load_fer2013": "ferjax.data",
    "load_ferplus": "ferjax.data",
    "with_ferplus_labels": "ferjax.data",
    "FerData": "ferjax.data",
    "create_model": "ferjax.models",
    "model_names": "ferjax.models",
    "TrainConfig": "ferjax.config",
    "default_config": "ferjax.config",
    "train_and_evaluate": "ferjax.train",
    "evaluate_checkpoint": "ferjax.evaluate",
    "load_model": "ferjax.checkpoint",
    "Predictor": "ferjax.inference",
    "FaceDetector": "ferjax.faces",
    "analyze_frame": "ferjax.video",
    "analyze_video": "ferjax.video",
    "run_pipeline": "ferjax.video",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'ferjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  # The lazy public names too, so that a notebook's tab completion offers them.
  return sorted(set(globals()) | set(__all__))
