"""Starting a run from another run's weights (``--init_from``): fine-tuning.

The source is a trained run's best checkpoint (its parameter EMA where it kept
one), of the same model with the same options. Its parameters and BatchNorm
statistics replace the fresh ones; the optimiser starts afresh, with the run's
own schedule. Weights whose shape differs stay as initialised, which is how a
run on another label set (FER+'s 8 classes from a 7-class FER2013 run, or an
image-folder data set) gets a new classifier on a trained trunk.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from flax import nnx

from ferjax import checkpoint as checkpoint_lib
from ferjax.config import TrainConfig
from ferjax.errors import ConfigError


def load_source(config: TrainConfig, workdir: str) -> tuple[nnx.Module, dict] | None:
  """The run named by ``config.init_from``, checked before anything is written.

  Returns ``(model, meta)`` from its best checkpoint, or None without ``init_from``.

  Raises:
    CheckpointError: no readable checkpoint there.
    ConfigError: the run's own workdir, or another model or other model options.
  """
  source = config.init_from
  if source is None:
    return None
  model, meta = checkpoint_lib.load_other_run(
      source, workdir, "--init_from",
      "to go on training a run, run its command again (it resumes from the latest checkpoint)")
  if meta["model"] != config.model:
    raise ConfigError(f"--init_from={source} holds model {meta['model']!r}; this run trains "
                      f"{config.model!r} (--model)")
  theirs = meta["config"].get("model_overrides", {})
  ours = json.loads(json.dumps(config.model_overrides))  # Tuples as lists, as saved.
  if theirs != ours:
    raise ConfigError(f"--init_from={source} was trained with model options {theirs or '(none)'}, "
                      f"this run has {ours or '(none)'} (--model_option)")
  return model, meta


def copy_weights(target: Any, source: nnx.Module) -> tuple[Any, list[str]]:
  """``target`` (a model state: parameters and BatchNorm statistics) with ``source``'s values.

  Returns the new state and the names of the weights left as they were because
  their shape or dtype differs (e.g. ``classifier.kernel`` for another number
  of classes).
  """
  values = dict(jax.tree_util.tree_leaves_with_path(nnx.state(source, nnx.Not(nnx.RngState))))
  kept = []

  def take(path, leaf):
    value = values.get(path)
    if value is None or value.shape != leaf.shape or value.dtype != leaf.dtype:
      kept.append(_name(path))
      return leaf
    return value

  return jax.tree_util.tree_map_with_path(take, target), kept


def _name(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return ".".join(p for p in parts if p != "value")
