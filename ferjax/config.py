"""Training configuration: one frozen dataclass, with per-model defaults."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from ferjax.augment import AugmentConfig
from ferjax.errors import ConfigError, is_whole
from ferjax.models import check_options, model_names

OPTIMIZERS = ("adamw", "adam", "sgd")
LABEL_SETS = ("fer2013", "ferplus")
CLASS_WEIGHTING = ("none", "balanced", "sqrt")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides what a training run computes.

  Two runs with equal configs (and data) produce the same parameters; the
  fields in ``RUN_CONTROL_FIELDS`` only say how long to run and how often to
  report, so a resumed run may change them.
  """

  model: str = "acnn_alstm"
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  labels: str = "fer2013"
  soft_targets: bool = False  # FER+ only: fit the vote distributions, not the majority.
  # Knowledge distillation: a trained run's workdir (or several, comma-separated:
  # their predictions are averaged) whose predictions on the training images
  # are mixed into the targets with weight distill_weight. Or the
  # teacher_predictions.npz a distilled run saved: those averaged predictions.
  distill_from: str | None = None
  distill_weight: float = 0.5
  # Fine-tuning: a trained run's workdir whose best checkpoint (same model and options)
  # gives the starting weights; weights of another shape (a classifier for another label
  # set) start fresh. The optimiser and its schedule start afresh either way.
  init_from: str | None = None
  epochs: int = 40
  batch_size: int = 64
  optimizer: str = "adamw"
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  momentum: float = 0.9  # SGD (Nesterov) only.
  warmup_epochs: float = 1.0
  grad_clip: float = 5.0  # Global-norm clipping; 0 turns it off.
  label_smoothing: float = 0.1
  class_weighting: str = "none"
  ema_decay: float = 0.0  # 0 turns the parameter EMA off.
  # Stochastic weight averaging: the last swa_epochs epochs run at the constant
  # swa_learning_rate (default: learning_rate / 10; the cosine decay before them ends
  # there), and the weights at the end of each of them are averaged. The average,
  # its BatchNorm statistics recomputed on the training faces, is the run's result.
  swa_epochs: int = 0
  swa_learning_rate: float | None = None
  seed: int = 0
  augment: AugmentConfig = AugmentConfig()
  train_split: str = "Training"
  eval_split: str = "PublicTest"
  test_split: str = "PrivateTest"
  # Run control: may change between a run and its resumption.
  max_steps: int | None = None
  eval_every: int | None = None  # Steps; default once per epoch.
  checkpoint_every: int | None = None  # Steps; default at every evaluation.
  eval_batch_size: int = 256

  def __post_init__(self):
    # Types first: a float batch size or a dict for augment would otherwise pass the checks
    # below and fail deep inside training, after the workdir is written.
    for name in ("epochs", "batch_size", "eval_batch_size", "seed", "swa_epochs", "max_steps",
                 "eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if not (value is None and name in _OPTIONAL_INT_FIELDS or is_whole(value)):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    for name in ("distill_weight", "learning_rate", "weight_decay", "momentum", "warmup_epochs",
                 "grad_clip", "label_smoothing", "ema_decay", "swa_learning_rate"):
      value = getattr(self, name)
      if value is None and name == "swa_learning_rate":
        continue
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or not math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    for name in ("init_from", "distill_from"):
      # A pathlib.Path is kept as its text: config.json is written with json, which fails on
      # it half-way through the file, in a new workdir; a number failed later, obscurely.
      value = getattr(self, name)
      if isinstance(value, os.PathLike):
        value = os.fspath(value)
        object.__setattr__(self, name, value)
      if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a path (a run's workdir), got {value!r}")
    if not isinstance(self.model_overrides, dict):
      raise ConfigError(f"model_overrides must be a dict of model options, got "
                        f"{self.model_overrides!r}")
    if not isinstance(self.augment, AugmentConfig):
      raise ConfigError(f"augment must be a ferjax.augment.AugmentConfig, e.g. "
                        f"AugmentConfig(mixup_alpha=0.2), got {self.augment!r}")
    if self.model not in model_names():
      raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(model_names())}")
    check_options(self.model, self.model_overrides)
    _choice("optimizer", self.optimizer, OPTIMIZERS)
    _choice("labels", self.labels, LABEL_SETS)
    _choice("class_weighting", self.class_weighting, CLASS_WEIGHTING)
    if not 0 <= self.distill_weight <= 1:
      raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
    if self.soft_targets and self.labels != "ferplus":
      raise ConfigError("soft_targets needs labels=ferplus (FER2013 has one label per face)")
    for name in ("epochs", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
    for name in ("max_steps", "eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ConfigError(f"{name} must be at least 1 (or unset), got {value}")
    if not self.learning_rate > 0:
      raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
    if not 0 <= self.label_smoothing < 1:
      raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not 0 <= self.ema_decay < 1:
      raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if not 0 <= self.swa_epochs <= self.epochs:
      raise ConfigError(f"swa_epochs must be between 0 and epochs ({self.epochs}), got "
                        f"{self.swa_epochs}")
    if self.swa_learning_rate is not None and not self.swa_learning_rate > 0:
      raise ConfigError(f"swa_learning_rate must be positive, got {self.swa_learning_rate}")
    if self.swa_learning_rate is not None and not self.swa_epochs:
      raise ConfigError("swa_learning_rate needs swa_epochs (the epochs whose weights are "
                        "averaged)")
    if self.swa_epochs and self.ema_decay:
      raise ConfigError("ema_decay and swa_epochs both average the weights; use one of them")
    for name in ("weight_decay", "grad_clip", "warmup_epochs"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
    if not 0 <= self.momentum < 1:
      raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")

  @property
  def swa_lr(self) -> float:
    """The learning rate of the averaged epochs (``swa_learning_rate`` or its default)."""
    return (self.learning_rate / 10 if self.swa_learning_rate is None
            else self.swa_learning_rate)

  def to_dict(self) -> dict[str, Any]:
    """Every field, ``augment`` as a nested dict (what ``config.json`` and checkpoints hold)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    """The inverse of :meth:`to_dict`; ConfigError for an unknown field or a bad value."""
    d = dict(d)
    # AugmentConfig takes JSON's lists for its ranges itself (and leaves them unchanged here).
    augment = d.pop("augment", None) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown config fields {unknown}")
    unknown = sorted(set(augment) - {f.name for f in dataclasses.fields(AugmentConfig)})
    if unknown:
      raise ConfigError(f"unknown augment fields {unknown}")
    return cls(**d, augment=AugmentConfig(**augment))

  def identity(self) -> dict[str, Any]:
    """The fields that must match for a run to resume from a checkpoint."""
    d = self.to_dict()
    for name in RUN_CONTROL_FIELDS:
      d.pop(name)
    return json.loads(json.dumps(d))  # Tuples to lists, as after a JSON round trip.


RUN_CONTROL_FIELDS = ("max_steps", "eval_every", "checkpoint_every", "eval_batch_size")
_OPTIONAL_INT_FIELDS = ("max_steps", "eval_every", "checkpoint_every")

# Each model's defaults: the settings of its full-schedule run in the README's
# results table (experiments/reproduce_results.sh), so that the plain command
# `python -m experiments.train --model=NAME` reproduces that row.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "dnn": dict(optimizer="adamw", learning_rate=1e-3, weight_decay=5e-4, epochs=30),
    "cnn_lstm": dict(optimizer="adamw", learning_rate=2e-3, weight_decay=1e-4, epochs=40),
    "cnn_alstm": dict(optimizer="adamw", learning_rate=2e-3, weight_decay=1e-4, epochs=40),
    "acnn_alstm": dict(optimizer="adamw", learning_rate=2e-3, weight_decay=1e-4, epochs=40),
    # Bigger: stronger decoupled weight decay against overfitting.
    "vgg_alstm": dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, epochs=30),
}


def default_config(model: str, **changes) -> TrainConfig:
  """The recommended config for ``model``, with ``changes`` applied on top."""
  if model not in model_names():
    raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(model_names())}")
  return TrainConfig(model=model, **{**MODEL_DEFAULTS.get(model, {}), **changes})


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
