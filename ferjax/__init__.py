"""ferjax: facial expression recognition with JAX and Flax NNX."""

import os

__version__ = "0.1.0"

# XLA:CPU runs convolutions through YNNPACK by default; for the convolution
# shapes of these models (3x3, 1-256 channels, 6-48 px) its backward passes
# are slower than XLA's Eigen convolutions, while YNNPACK's dots and
# reductions are faster. This choice made a training step 1.2x faster on the
# project's 2-core Zen 4 machine (BUILD_NOTES.md, Speed). It only touches the
# CPU backend, never overrides a user's own setting of the flag, applies only
# to the jaxlib versions it was measured on, and is skipped when JAX already
# started or FERJAX_KEEP_XLA_FLAGS is set.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_VALUE = "individual_dot,reduce"


def _tune_xla_cpu() -> None:
  if os.environ.get("FERJAX_KEEP_XLA_FLAGS"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags:
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
  os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}={_YNN_VALUE}".strip()


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
