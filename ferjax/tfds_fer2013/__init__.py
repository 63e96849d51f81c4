"""FER2013 as a TFDS dataset (``fer2013``), built and read without TensorFlow.

Importing this package registers the ``fer2013`` builder with TFDS, so
``tfds.data_source("fer2013", data_dir=...)`` finds it once it is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from ferjax import data as data_lib
from ferjax.errors import DataError
from ferjax.tfds_fer2013.fer2013 import SOURCE_NAMES, SPLITS, Fer2013, find_source

__all__ = ["Fer2013", "SOURCE_NAMES", "SPLITS", "build", "find_source", "load"]


def build(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Fer2013:
  """Builds the ``fer2013`` TFDS dataset from Kaggle's file.

  Args:
    manual_dir: a directory holding one of :data:`SOURCE_NAMES`.
    data_dir: where TFDS writes the dataset (``<data_dir>/fer2013/1.0.0``);
      None means TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    overwrite: rebuild even if the dataset is already there.

  Returns:
    The prepared builder; ``builder.as_data_source(split)`` reads it.

  Raises:
    DataError: ``manual_dir`` holds no accepted file, or the file is malformed.
  """
  builder = Fer2013(data_dir=_expand(data_dir))
  if builder.is_prepared() and not overwrite:
    return builder
  # Checked here too so a missing file reads as ours, not TFDS's "empty dir"
  # assertion, which fires first when the directory is missing or empty.
  manual_dir = os.path.abspath(_expand(manual_dir))
  source = find_source(manual_dir)
  if builder.is_prepared():
    # TFDS deletes the built dataset before it reads the source: a bad file would leave
    # nothing. Parse it first, so a malformed source fails with the old dataset intact.
    data_lib.load_fer2013(source, cache=False)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode,
      # Nothing of ours is on TFDS's GCS bucket; skip the network probe.
      try_download_gcs=False))
  return builder


def load(
    split: str | None = "train",
    data_dir: str | os.PathLike | None = None,
) -> Sequence[dict[str, Any]] | dict[str, Sequence[dict[str, Any]]]:
  """Opens a built split as a random-access TFDS data source (no TensorFlow).

  Args:
    split: ``train``, ``validation``, ``test``, any TFDS split expression
      (``"train[:10%]"``), or None for a dict of all three.
    data_dir: the ``data_dir`` given to :func:`build`.

  Returns:
    A sequence whose items are ``{"image": uint8 (48, 48, 1), "label": int,
    "row": int}``, in CSV order; a dict of them by split name when ``split`` is
    None.

  Raises:
    DataError: the dataset has not been built in ``data_dir``.
  """
  data_dir = _expand(data_dir)
  builder = Fer2013(data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError("FER2013 is not built here; run ferjax.tfds_fer2013.build("
                    "manual_dir, data_dir) first", path=builder.data_dir)
  return tfds.data_source("fer2013", split=split, data_dir=data_dir, download=False)


def _expand(path: str | os.PathLike | None) -> str | None:
  """``~`` expanded (TFDS takes paths literally)."""
  return None if path is None else os.path.expanduser(os.fspath(path))
