"""The model registry: every model by the name the entrypoints' ``--model`` takes."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable

from flax import nnx

from ferjax.errors import ConfigError, is_whole
from ferjax.models.alstm import AttentionLSTM
from ferjax.models.dnn import DNN

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "dnn": DNN,
    "cnn_lstm": functools.partial(AttentionLSTM, local_attention=False, global_attention=False),
    "cnn_alstm": functools.partial(AttentionLSTM, local_attention=False, global_attention=True),
    "acnn_alstm": functools.partial(AttentionLSTM, local_attention=True, global_attention=True),
    # The stronger model: a VGG-style BatchNorm trunk (two 3x3 convs per stage,
    # 48 → 24 → 12 → 6) under the same two-attention LSTM head.
    "vgg_alstm": functools.partial(
        AttentionLSTM, widths=(32, 32, 64, 64, 128, 128, 256, 256), pool_after=(1, 3, 5),
        local_attention=True, global_attention=True, lstm_hidden=256, attention_size=128),
}


def model_names() -> tuple[str, ...]:
  """Names accepted by :func:`create_model` and ``--model``."""
  return tuple(MODELS)


def model_options(name: str) -> dict[str, object]:
  """The keyword options of a model with their defaults (what overrides may set)."""
  factory = _factory(name)
  base = factory.func if isinstance(factory, functools.partial) else factory
  defaults = {k: p.default for k, p in inspect.signature(base.__init__).parameters.items()
              if p.kind == p.KEYWORD_ONLY and k != "rngs"}
  if isinstance(factory, functools.partial):
    defaults.update(factory.keywords)
  return defaults


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: one of :func:`model_names`.
    num_classes: 7 for FER2013, 8 for FER+.
    rngs: initialisation (``params``) and ``dropout`` streams.
    **overrides: model options to change, e.g. ``lstm_hidden=256``; see
      :func:`model_options`.

  Returns:
    The model; it maps float ``(B, 48, 48, 1)`` from ``preprocess`` to logits.

  Raises:
    ConfigError: unknown name or option, ``num_classes`` not a whole number
      of at least 2, or ``rngs`` not an ``nnx.Rngs``.
  """
  factory = _factory(name)
  # Checked here: 0 classes fails in the initialiser (ZeroDivisionError), "7" in JAX.
  if not is_whole(num_classes, 2):
    raise ConfigError(f"num_classes must be a whole number of at least 2, got {num_classes!r}")
  # A seed or None fails in the first layer's initialiser, as an AttributeError (no .params).
  if not isinstance(rngs, nnx.Rngs):
    raise ConfigError(f"rngs must be a flax.nnx.Rngs, e.g. rngs=nnx.Rngs(0), got {rngs!r}")
  check_options(name, overrides)
  return factory(num_classes, rngs=rngs, **overrides)


def check_options(name: str, overrides: dict[str, object]) -> None:
  """Raises ConfigError unless every override is an option of ``name`` with a fitting value.

  A switch takes true or false only (any other text, e.g. "no", would read as
  on); a size or count a whole number of at least 1; ``dropout`` a rate in
  [0, 1); a tuple of sizes whole numbers (``pool_after``: block indices from 0).
  """
  defaults = model_options(name)
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ConfigError(f"model {name!r} has no option {', '.join(unknown)}; "
                      f"its options are {', '.join(sorted(defaults))}")
  for key, value in overrides.items():
    default = defaults[key]
    if isinstance(default, bool):
      ok, need = isinstance(value, bool), "true or false"
    elif isinstance(default, numbers.Integral):
      ok, need = is_whole(value, 1), "a whole number of at least 1"
    elif key == "dropout":
      ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and 0 <= value < 1)
      need = "a rate in [0, 1)"
    elif isinstance(default, (tuple, list)):
      least = 0 if key == "pool_after" else 1
      ok = isinstance(value, (tuple, list)) and all(is_whole(v, least) for v in value)
      need = f"a tuple of whole numbers of at least {least}, e.g. {key}={tuple(default)}"
    else:
      continue
    if not ok:
      raise ConfigError(f"model option {key}={value!r}: must be {need}")


def check_model(model) -> None:
  """Raises ConfigError unless ``model`` is a Flax NNX model, naming a ``load_model`` pair.

  The ``(model, meta)`` pair of :func:`ferjax.checkpoint.load_model`, not unpacked,
  would otherwise fail as an AttributeError ('tuple' object has no attribute 'eval').
  """
  if isinstance(model, nnx.Module):
    return
  hint = ("; load_model returns (model, meta): unpack it, model, meta = load_model(...)"
          if isinstance(model, tuple) and model and isinstance(model[0], nnx.Module) else "")
  raise ConfigError(f"model must be a ferjax model (a flax.nnx.Module, from create_model or "
                    f"load_model), got {type(model).__name__}{hint}")


def _factory(name: str):
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  return MODELS[name]
