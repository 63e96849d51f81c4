"""A run's data: the data set its config names, its splits, and their digests.

Training and evaluation both load a run's data here, so a checkpoint is
evaluated on the splits it was trained and selected on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from ferjax import data as data_lib
from ferjax.errors import ConfigError

if TYPE_CHECKING:  # Annotations only: importing config would load the models (and Flax).
  from ferjax.config import TrainConfig

log = logging.getLogger(__name__)


def load_run_data(config: TrainConfig, data_path: str | None, *,
                  ferplus_path: str | None = None, on_error: str = "raise"
                  ) -> data_lib.FerData:
  """Loads FER2013 (and FER+ labels when ``config.labels == "ferplus"``): all its splits.

  The data set a run's config names, for training it and for evaluating its
  checkpoints alike.
  """
  data = data_lib.load_fer2013(data_lib.fer2013_path(data_path), on_error=on_error)
  if config.labels == "ferplus":
    ferplus_path = ferplus_path or os.environ.get("FERPLUS_PATH")
    if not ferplus_path:
      raise ConfigError("--labels=ferplus needs --ferplus=PATH/TO/fer2013new.csv "
                        "(or FERPLUS_PATH)")
    data = data_lib.with_ferplus_labels(data, data_lib.load_ferplus(ferplus_path))
  elif ferplus_path:  # The environment's FERPLUS_PATH is for FER+ runs; a flag is a choice.
    log.warning("--ferplus=%s is not used: this run has %s labels, not FER+", ferplus_path,
                config.labels)
  return data


def check_run_data(config: TrainConfig, data) -> None:
  """Refuses data handed to a run (``data=``) that does not fit its config.

  Loaded by :func:`load_run_data`, the data always fits; data passed in may be
  a path, or FER2013 labels for a FER+ run (and the reverse), which trained a
  model of the wrong number of classes under the wrong label set, silently.

  Raises:
    TypeError: ``data`` is not a FerData.
    ConfigError: its label set is not the one ``config.labels`` names, or
      ``soft_targets`` is set and it has no vote distributions.
  """
  if not isinstance(data, data_lib.FerData):
    raise TypeError(f"data must be a FerData (from ferjax.data.load_fer2013), got "
                    f"{type(data).__name__}; pass a file as data_path")
  is_ferplus = tuple(data.class_names) == data_lib.FERPLUS_CLASSES
  if config.labels == "ferplus" and not is_ferplus:
    raise ConfigError(f"labels=ferplus, but the data has the {data.num_classes} classes "
                      f"{', '.join(data.class_names)}; relabel it with ferjax.data."
                      "with_ferplus_labels(data, load_ferplus(...)), or train with labels=fer2013")
  if config.labels != "ferplus" and is_ferplus:
    raise ConfigError(f"labels={config.labels}, but the data has FER+ labels (8 classes, with "
                      "contempt); train with labels=ferplus")
  if config.soft_targets and data.soft_labels is None:
    raise ConfigError("soft_targets needs FER+ vote distributions (data.soft_labels), which this "
                      "data lacks; relabel it with ferjax.data.with_ferplus_labels")


# Image folders have train/ and test/ only. The checkpoint is then selected on a
# held-out tenth of train (stratified, fixed seed), never on the split it is
# reported on.
HELD_OUT_SPLIT = "validation"
HELD_OUT_FRACTION = 0.1


def resolve_splits(config: TrainConfig, data: data_lib.FerData
                   ) -> tuple[TrainConfig, data_lib.FerData]:
  """Maps the default CSV split names onto data with other splits: ``(config, data)``.

  For an image folder's train/test: learn on ``train`` less a held-out tenth
  (:data:`HELD_OUT_SPLIT`), select the checkpoint on that tenth, report
  ``test``.
  """
  have = given = data.split_names
  held_out = ""
  fallback = {"Training": "train", "PublicTest": HELD_OUT_SPLIT, "PrivateTest": "test"}
  # The held-out tenth is made again (the same faces: a fixed seed) for a config that
  # already names it, as a checkpoint's saved config does.
  if config.eval_split not in have and HELD_OUT_SPLIT in (
      config.eval_split, fallback.get(config.eval_split)) and "train" in have:
    data = data.with_held_out("train", HELD_OUT_SPLIT, HELD_OUT_FRACTION)
    have = data.split_names
    held_out = f"; {HELD_OUT_SPLIT} is a held-out tenth of train"
  changes = {}
  for field in ("train_split", "eval_split", "test_split"):
    name = getattr(config, field)
    if name not in have:
      alt = fallback.get(name)
      if alt not in have:
        raise ConfigError(f"--{field}={name}: the data has splits {', '.join(have)}")
      changes[field] = alt
  if changes:
    log.warning("this data has splits %s, not FER2013's; using %s%s", ", ".join(given),
                ", ".join(f"{k}={v}" for k, v in changes.items()), held_out)
  return dataclasses.replace(config, **changes), data


def fingerprint(split: data_lib.FerData) -> str:
  """A digest of a split's images and labels, to tell whether saved predictions (or a
  resumed run) belong to it."""
  digest = hashlib.sha256(np.ascontiguousarray(split.images).tobytes())
  digest.update(np.ascontiguousarray(split.labels, np.int64).tobytes())
  return digest.hexdigest()
