"""The fer2013 TFDS builder: every manual-dir form, read back without TensorFlow."""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import fer_rows, pixel_string, write_csv
from ferjax import tfds_fer2013
from ferjax.data import FER2013_CLASSES
from ferjax.errors import DataError

# The tests here share a module fixture (a built TFDS data set): one pytest-xdist worker runs
# them all, so it is made once.
pytestmark = pytest.mark.xdist_group("test_tfds")

NUM_ROWS = 20
# fer_rows cycles Usage over the CSV's three values, so row i is in split i % 3.
_USAGE_SPLIT = ("train", "validation", "test")


def _expected_rows(split):
  return [i for i in range(NUM_ROWS) if _USAGE_SPLIT[i % 3] == split]


def _image(i):
  return np.array(pixel_string(i).split(), np.uint8).reshape(48, 48, 1)


def _assert_matches_csv(source, split):
  rows = _expected_rows(split)
  assert len(source) == len(rows)
  for index, row in enumerate(rows):
    example = source[index]
    assert example["row"] == row
    assert example["label"] == row % 7
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], _image(row))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A dataset built from a plain fer2013.csv; returns its data_dir."""
  root = tmp_path_factory.mktemp("tfds")
  manual = root / "manual"
  manual.mkdir()
  write_csv(manual / "fer2013.csv", fer_rows(NUM_ROWS))
  data_dir = root / "data"
  tfds_fer2013.build(manual, data_dir)
  return str(data_dir)


def test_data_source_reads_every_split(built):
  for split in _USAGE_SPLIT:
    source = tfds.data_source("fer2013", split=split, data_dir=built, download=False)
    _assert_matches_csv(source, split)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed, so this cannot show it is not needed")
def test_build_and_read_without_tensorflow(built):
  # The build in `built` and this read ran in this process with TF absent; TFDS
  # must not have put a module (or stub) named tensorflow in its place.
  for split in _USAGE_SPLIT:
    tfds_fer2013.load(split, built)[0]
  assert "tensorflow" not in sys.modules
  assert not any(name.startswith("tensorflow.") for name in sys.modules)


def test_load_helper(built):
  sources = tfds_fer2013.load(None, built)
  assert sorted(sources) == sorted(_USAGE_SPLIT)
  _assert_matches_csv(tfds_fer2013.load("validation", built), "validation")
  # A split expression is applied, not ignored: half of the 7 train rows (3.5, rounded to the
  # closest) are the first 4, in CSV order, and the other half the last 3.
  train = _expected_rows("train")
  assert len(train) == 7
  first_half = tfds_fer2013.load("train[:50%]", built)
  assert [x["row"] for x in first_half] == train[:4]
  assert [x["row"] for x in tfds_fer2013.load("train[50%:]", built)] == train[4:]


def test_info(built):
  builder = tfds_fer2013.Fer2013(data_dir=built)
  info = builder.info
  assert info.name == "fer2013"
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert info.features["label"].names == list(FER2013_CLASSES)
  assert info.features["image"].shape == (48, 48, 1)
  assert info.features["image"].np_dtype == np.uint8
  assert info.supervised_keys == ("image", "label")
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      s: len(_expected_rows(s)) for s in _USAGE_SPLIT}
  assert "Challenges in Representation Learning" in info.citation
  assert "1307.0414" in info.citation
  assert info.homepage.startswith("https://www.kaggle.com/")


def test_build_reuses_existing(built, tmp_path):
  # Already built: no manual file needed, nothing rewritten.
  builder = tfds_fer2013.build(tmp_path / "empty", built)
  assert builder.is_prepared()


def test_a_bad_source_does_not_destroy_a_built_dataset(tmp_path):
  good, bad, data_dir = tmp_path / "good", tmp_path / "bad", tmp_path / "data"
  good.mkdir()
  bad.mkdir()
  write_csv(good / "fer2013.csv", fer_rows(NUM_ROWS))
  rows = fer_rows(NUM_ROWS)
  rows[5] = "3,1 2 3,Training"  # Three pixels instead of 2304.
  write_csv(bad / "fer2013.csv", rows)
  tfds_fer2013.build(good, data_dir)
  with pytest.raises(DataError, match="fer2013.csv:7"):
    tfds_fer2013.build(bad, data_dir, overwrite=True)
  _assert_matches_csv(tfds_fer2013.load("test", data_dir), "test")  # Still there.


@pytest.mark.parametrize("form", ["fer2013.tar.gz", "fer2013.csv.gz", "fer2013/fer2013.csv"])
def test_other_manual_forms(tmp_path, form):
  csv = write_csv(tmp_path / "fer2013.csv", fer_rows(NUM_ROWS))
  manual = tmp_path / "manual"
  (manual / "fer2013").mkdir(parents=True)
  target = manual / form
  if form.endswith(".tar.gz"):
    with tarfile.open(target, "w:gz") as tar:
      tar.add(csv, arcname="fer2013/fer2013.csv")
  elif form.endswith(".gz"):
    target.write_bytes(gzip.compress(open(csv, "rb").read()))
  else:
    os.replace(csv, target)
  assert tfds_fer2013.find_source(manual) == str(target)
  data_dir = tmp_path / "data"
  tfds_fer2013.build(manual, data_dir)
  _assert_matches_csv(tfds_fer2013.load("test", data_dir), "test")


def test_paths_starting_with_a_tilde_are_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "manual").mkdir()
  write_csv(tmp_path / "manual" / "fer2013.csv", fer_rows(NUM_ROWS))
  tfds_fer2013.build("~/manual", "~/tensorflow_datasets")
  assert (tmp_path / "tensorflow_datasets" / "fer2013").is_dir()
  _assert_matches_csv(tfds_fer2013.load("test", "~/tensorflow_datasets"), "test")


def test_missing_file_names_accepted_files(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.zip").write_bytes(b"not it")
  with pytest.raises(DataError) as err:
    tfds_fer2013.build(manual, tmp_path / "data")
  message = str(err.value)
  assert str(manual) in message
  for name in ("fer2013.csv", "fer2013.csv.gz", "fer2013.tar.gz"):
    assert name in message
  with pytest.raises(DataError, match="does not exist"):
    tfds_fer2013.build(tmp_path / "nowhere", tmp_path / "data")
  assert not (tmp_path / "data" / "fer2013" / "1.0.0").exists()


def test_load_before_build(tmp_path):
  with pytest.raises(DataError, match="not built"):
    tfds_fer2013.load("train", tmp_path)


@pytest.mark.slow
def test_real_data_split_sizes(fer2013_path, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  name = next(n for n in ("fer2013.tar.gz", "fer2013.csv.gz", "fer2013.csv")
              if fer2013_path.endswith(n[len("fer2013"):]))
  os.symlink(os.path.abspath(fer2013_path), manual / name)
  tfds_fer2013.build(manual, tmp_path / "data")
  sizes = {s: len(tfds_fer2013.load(s, tmp_path / "data")) for s in _USAGE_SPLIT}
  assert sizes == {"train": 28709, "validation": 3589, "test": 3589}
