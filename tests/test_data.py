"""FER2013 / FER+ readers: every supported form, every bad input, the cache."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import cv2
import numpy as np
import pytest

from conftest import fer_rows, pixel_string, write_csv
from ferjax import data as data_lib
from ferjax.errors import DataError


def _expected_images(n):
  return np.stack([np.array(pixel_string(i).split(), np.uint8).reshape(48, 48, 1)
                   for i in range(n)])


def test_reads_plain_csv(tmp_path, cache_dir):
  path = write_csv(tmp_path / "fer2013.csv", fer_rows(10))
  d = data_lib.load_fer2013(path)
  assert d.images.shape == (10, 48, 48, 1) and d.images.dtype == np.uint8
  np.testing.assert_array_equal(d.images, _expected_images(10))
  np.testing.assert_array_equal(d.labels, np.arange(10) % 7)
  assert d.labels.dtype == np.int32
  assert list(d.splits[:3]) == ["Training", "PublicTest", "PrivateTest"]
  np.testing.assert_array_equal(d.rows, np.arange(10))
  assert d.split_names == ("Training", "PublicTest", "PrivateTest")
  assert len(d.split("PublicTest")) == 3


def test_ferdata_prints_as_one_summary_line(tmp_path, cache_dir):
  # Before: the dataclass repr printed every array, 4,700 characters for 10 faces (numpy
  # elides the middle), a page in a notebook or a log for the real data.
  path = write_csv(tmp_path / "fer2013.csv", fer_rows(10))
  text = repr(data_lib.load_fer2013(path))
  assert text == (f"FerData(10 faces, 7 classes, Training 4, PublicTest 3, PrivateTest 3, "
                  f"source={path!r})"), text


def test_gzip_and_tar_forms_equal_plain(tmp_path, cache_dir):
  rows = fer_rows(9)
  plain = write_csv(tmp_path / "fer2013.csv", rows)
  gz = tmp_path / "fer2013.csv.gz"
  gz.write_bytes(gzip.compress(open(plain, "rb").read()))
  tgz = tmp_path / "fer2013.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(plain, arcname="fer2013/fer2013.csv")
    info = tarfile.TarInfo("fer2013/README")
    info.size = 5
    tar.addfile(info, io.BytesIO(b"hello"))
  ref = data_lib.load_fer2013(plain, cache=False)
  for path in (gz, tgz):
    d = data_lib.load_fer2013(path, cache=False)
    np.testing.assert_array_equal(d.images, ref.images)
    np.testing.assert_array_equal(d.labels, ref.labels)
    np.testing.assert_array_equal(d.splits, ref.splits)


def test_crlf_bom_and_column_order(tmp_path, cache_dir):
  rows = [f"{u},{e},{p}" for e, p, u in (r.split(",") for r in fer_rows(4))]
  path = tmp_path / "x.csv"
  write_csv(path, rows, header="Usage, emotion ,pixels", newline="\r\n")
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  d = data_lib.load_fer2013(path, cache=False)
  np.testing.assert_array_equal(d.images, _expected_images(4))
  np.testing.assert_array_equal(d.labels, np.arange(4) % 7)


@pytest.mark.parametrize("spelling", ["short", "long"])
def test_image_folders(tmp_path, cache_dir, spelling):
  names = {"short": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
           "long": ["anger", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]}
  images = _expected_images(14)
  for i in range(14):
    split = "train" if i < 10 else "test"
    folder = tmp_path / "faces" / split / names[spelling][i % 7]
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"im{i}.png"), images[i, ..., 0])
  (tmp_path / "faces" / "train" / "happy" / ".DS_Store").write_bytes(b"junk")
  d = data_lib.load_fer2013(tmp_path / "faces")
  assert len(d) == 14 and d.split_names == ("train", "test")
  assert len(d.split("train")) == 10
  # Each image keeps its own label: match them up by content.
  for i in range(14):
    k = np.flatnonzero((d.images == images[i]).all(axis=(1, 2, 3)))
    assert len(k) == 1 and d.labels[k[0]] == i % 7


def test_held_out_split_is_stratified_disjoint_and_repeatable():
  n = 140
  labels = (np.arange(n) % 7).astype(np.int32)
  labels[:30] = 3  # Classes of different sizes.
  splits = np.array(["train"] * 120 + ["test"] * 20)
  d = data_lib.FerData(images=np.zeros((n, 48, 48, 1), np.uint8), labels=labels, splits=splits,
                       rows=np.arange(n, dtype=np.int32))
  held = d.with_held_out("train", "validation", 0.1, seed=0)
  assert held.split_names == ("train", "test", "validation")
  val, train = held.split("validation"), held.split("train")
  assert len(val) + len(train) == 120 and len(held.split("test")) == 20
  assert not set(val.rows) & set(train.rows) and set(val.rows) <= set(range(120))
  counts = np.bincount(d.split("train").labels, minlength=7)
  assert (val.class_counts() == np.maximum(np.round(0.1 * counts), 1)).all()
  again = d.with_held_out("train", "validation", 0.1, seed=0)
  np.testing.assert_array_equal(again.splits, held.splits)
  assert not np.array_equal(d.with_held_out("train", "validation", 0.1, seed=1).splits,
                            held.splits)
  with pytest.raises(DataError, match="already has a split named 'test'"):
    d.with_held_out("train", "test", 0.1)


@pytest.mark.parametrize("change, message", [
    # Before, each failed deep inside train_and_evaluate: "not enough values to unpack", an
    # IndexError in the loss, and so on.
    (dict(images=np.zeros((4, 48, 48), np.uint8)),
     r"images must be uint8 \(N, 48, 48, 1\) grey faces, got uint8 \(4, 48, 48\)"),
    (dict(images=np.zeros((4, 48, 48, 1), np.float32)), r"got float32 \(4, 48, 48, 1\)"),
    (dict(labels=np.array([0, 1, 7, 2])), r"labels must lie in 0..6 .*got 0..7"),
    (dict(labels=np.zeros(4, np.float32)), "labels must be integers"),
    (dict(splits=np.array(["Training"] * 3)), r"splits must have shape \(4,\), one per image"),
    # Before: accepted, to fail in training as an IndexError in a batch of soft targets.
    (dict(soft_labels=np.full((3, 7), 1 / 7, np.float32)),
     (r"soft_labels must be float \(N, C\) = \(4, 7\), one distribution over class_names per "
      r"image, got float32 \(3, 7\)")),
    (dict(soft_labels=np.eye(7, dtype=np.int64)[:4]), r"soft_labels must be float .*got int64"),
])
def test_a_hand_made_ferdata_is_checked(change, message):
  base = dict(images=np.zeros((4, 48, 48, 1), np.uint8), labels=np.arange(4, dtype=np.int32),
              splits=np.array(["Training"] * 4), rows=np.arange(4, dtype=np.int32))
  with pytest.raises(DataError, match=message):
    data_lib.FerData(**{**base, **change})
  # Lists are taken as arrays (before: a list of splits failed in split() on a bool).
  d = data_lib.FerData(**{**base, "splits": ["Training", "PublicTest"] * 2, "labels": [0, 1, 2, 3]})
  assert len(d.split("PublicTest")) == 2 and d.labels.dtype.kind == "i"


def test_image_folder_keeps_split_from_msambare_names(tmp_path, cache_dir):
  img = _expected_images(1)[0, ..., 0]
  for split, name in (("train", "Training_1.jpg"), ("test", "PublicTest_2.jpg"),
                      ("test", "PrivateTest_3.jpg")):
    folder = tmp_path / split / "sad"
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / name), img)
  d = data_lib.load_fer2013(tmp_path, cache=False)
  assert sorted(d.split_names) == ["PrivateTest", "PublicTest", "Training"]
  # The CSV's split names, but not its rows: FER+ labels cannot be joined on, even cached.
  fp_path = _ferplus_csv(tmp_path.parent / f"{tmp_path.name}-fp.csv", ["Training,a.png,0,10,0,0,0,0,0,0,0,0"] * 3)
  for data in (d, data_lib.load_fer2013(tmp_path), data_lib.load_fer2013(tmp_path)):
    assert not data.csv_rows
    with pytest.raises(DataError, match="load the CSV form of FER2013, not an image folder"):
      data_lib.with_ferplus_labels(data.split("Training"), data_lib.load_ferplus(fp_path))


def test_image_folder_errors(tmp_path, cache_dir):
  folder = tmp_path / "train" / "happy"
  folder.mkdir(parents=True)
  (folder / "notes.txt").write_text("not an image")
  with pytest.raises(DataError, match="notes.txt: not an image file"):
    data_lib.load_fer2013(tmp_path, cache=False)
  cv2.imwrite(str(folder / "ok.png"), _expected_images(1)[0, ..., 0])
  d = data_lib.load_fer2013(tmp_path, cache=False, on_error="skip")
  assert len(d) == 1 and len(d.skipped) == 1 and d.skipped[0].path.endswith("notes.txt")
  (tmp_path / "train" / "bored").mkdir()
  with pytest.raises(DataError, match="unknown emotion folder 'bored'"):
    data_lib.load_fer2013(tmp_path, cache=False)


_ONES = " ".join(["1"] * 2303)  # 2303 valid pixels; rows below add the 2304th.

BAD_ROWS = [
    ("wrong pixel count", f"0,{_ONES},Training", "expected 2304 pixel values (48x48), found 2303"),
    ("pixel out of range", f"0,256 {_ONES},Training", "pixel 1 is '256'"),
    ("pixel not an integer", f"0,{_ONES} 12.5,Training", "pixel 2304 is '12.5'"),
    ("negative pixel", f"0,-1 {_ONES},Training", "pixel 1 is '-1'"),
    ("unknown emotion", f"7,1 {_ONES},Training", "unknown emotion '7'"),
    ("unknown usage", f"0,1 {_ONES},Validation", "unknown Usage 'Validation'"),
    ("missing field", f"0,1 {_ONES}", "expected 3 comma-separated fields, found 2"),
    ("double space", f"0,1  {_ONES},Training", "pixel 2 is empty"),
    ("empty line", "", "empty line"),
]


@pytest.mark.parametrize("name,bad_row,message", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_file_and_line(tmp_path, cache_dir, name, bad_row, message):
  rows = fer_rows(6, usages=("Training",))
  rows[3] = bad_row
  path = write_csv(tmp_path / "bad.csv", rows)
  with pytest.raises(DataError) as info:
    data_lib.load_fer2013(path)
  assert info.value.line == 5  # Header is line 1; rows[3] is line 5.
  assert info.value.path == path
  assert str(info.value).startswith(f"{path}:5: ")
  assert message in str(info.value)


def test_bad_rows_past_the_first_chunk_name_their_own_line(tmp_path, monkeypatch):
  # Rows are parsed in chunks of 2048; every other test file fits in one. A line counted
  # from its chunk's start would name the wrong line of the real, 35,888-row file.
  monkeypatch.setattr(data_lib, "_CHUNK_ROWS", 4)
  rows = fer_rows(10, usages=("Training",))
  rows[5] = "9," + rows[5].split(",", 1)[1]  # Line 7, in the second chunk: a bad emotion.
  rows[8] = rows[8].replace(" ", " x", 1)  # Line 10, in the third chunk: a bad pixel.
  path = write_csv(tmp_path / "bad.csv", rows)
  with pytest.raises(DataError) as info:
    data_lib.load_fer2013(path, cache=False)
  assert info.value.line == 7 and str(info.value).startswith(f"{path}:7: unknown emotion")
  d = data_lib.load_fer2013(path, on_error="skip", cache=False)
  assert [e.line for e in d.skipped] == [7, 10]
  np.testing.assert_array_equal(d.rows, [0, 1, 2, 3, 4, 6, 7, 9])
  np.testing.assert_array_equal(d.images, _expected_images(10)[[0, 1, 2, 3, 4, 6, 7, 9]])


def test_skip_mode_drops_and_reports_bad_rows(tmp_path, cache_dir, caplog):
  rows = fer_rows(8)
  rows[1] = "9," + rows[1].split(",", 1)[1]
  rows[6] = rows[6].replace(" ", " x", 1)
  path = write_csv(tmp_path / "bad.csv", rows)
  with caplog.at_level("WARNING"):
    d = data_lib.load_fer2013(path, on_error="skip")
  assert len(d) == 6
  assert [e.line for e in d.skipped] == [3, 8]
  np.testing.assert_array_equal(d.rows, [0, 2, 3, 4, 5, 7])
  np.testing.assert_array_equal(d.images, _expected_images(8)[[0, 2, 3, 4, 5, 7]])
  assert "skipped 2 bad rows (lines 3, 8)" in caplog.text
  # The second load reads the cache; it reports the skipped rows all the same.
  caplog.clear()
  with caplog.at_level("WARNING"):
    again = data_lib.load_fer2013(path, on_error="skip")
  assert any(f.startswith("fer2013-") for f in os.listdir(cache_dir))
  assert [e.line for e in again.skipped] == [3, 8]
  assert "skipped 2 bad rows (lines 3, 8)" in caplog.text
  rows = fer_rows(4)
  rows[2] = "9," + rows[2].split(",", 1)[1]
  caplog.clear()
  with caplog.at_level("WARNING"):
    data_lib.load_fer2013(write_csv(tmp_path / "one_bad.csv", rows), on_error="skip")
  assert "skipped 1 bad row (line 4);" in caplog.text


def test_bad_files(tmp_path, cache_dir):
  with pytest.raises(DataError, match="no such file"):
    data_lib.load_fer2013(tmp_path / "missing.csv")
  empty = tmp_path / "empty.csv"
  empty.write_bytes(b"")
  with pytest.raises(DataError, match="empty"):
    data_lib.load_fer2013(empty)
  header_only = write_csv(tmp_path / "h.csv", [])
  with pytest.raises(DataError, match="no data rows"):
    data_lib.load_fer2013(header_only)
  no_usage = write_csv(tmp_path / "u.csv", ["0,1 2"], header="emotion,pixels")
  with pytest.raises(DataError, match=r":1: missing column\(s\) usage"):
    data_lib.load_fer2013(no_usage)
  # Not a CSV at all (a video, a long JSON line): named so, or cut, not quoted whole.
  video = tmp_path / "clip.mp4"
  video.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00" + bytes(range(256)) * 4)
  with pytest.raises(DataError, match=r"\(found: binary data, not CSV text\)$"):
    data_lib.load_fer2013(video)
  long_line = tmp_path / "meta.json"
  text = '{"item_handlers": ' + '"x", ' * 200 + "}"
  long_line.write_text(text + "\n")
  with pytest.raises(DataError) as e:
    data_lib.load_fer2013(long_line)
  assert e.value.reason.endswith(f"(found: {text[:120]}…)")
  empty_gz = tmp_path / "empty.csv.gz"
  empty_gz.write_bytes(gzip.compress(b""))
  with pytest.raises(DataError, match="decompresses to nothing"):
    data_lib.load_fer2013(empty_gz)
  not_gz = tmp_path / "junk.csv.gz"
  not_gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
  with pytest.raises(DataError, match="not a valid gzip file"):
    data_lib.load_fer2013(not_gz)


def test_a_path_that_is_not_a_path_names_the_argument(cache_dir):
  from ferjax.errors import ConfigError
  # Before: TypeError: expected str, bytes or os.PathLike object, not NoneType.
  with pytest.raises(ConfigError, match=r"path must be the path of fer2013.csv \(or .csv.gz, "
                                        r".tar.gz, an image folder\), got None; ferjax.data."
                                        r"fer2013_path\(None\) reads \$FER2013_PATH"):
    data_lib.load_fer2013(None)
  with pytest.raises(ConfigError, match=r"path must be the path of fer2013new.csv, got 3$"):
    data_lib.load_ferplus(3)


def test_truncated_gzip_names_the_line(tmp_path, cache_dir):
  plain = write_csv(tmp_path / "f.csv", fer_rows(40))
  full = gzip.compress(open(plain, "rb").read())
  cut = tmp_path / "cut.csv.gz"
  cut.write_bytes(full[:len(full) // 2])
  with pytest.raises(DataError, match="truncated") as info:
    data_lib.load_fer2013(cut)
  assert info.value.path == str(cut) and 2 <= info.value.line <= 41


def test_cache_hit_and_invalidation(tmp_path, cache_dir, monkeypatch):
  path = write_csv(tmp_path / "f.csv", fer_rows(5))
  first = data_lib.load_fer2013(path)
  assert len(list(cache_dir.glob("*.npz"))) == 1

  def no_parse(*args, **kwargs):
    raise AssertionError("parsed again instead of using the cache")

  monkeypatch.setattr(data_lib, "parse_fer2013_csv", no_parse)
  again = data_lib.load_fer2013(path)
  np.testing.assert_array_equal(again.images, first.images)
  monkeypatch.undo()
  monkeypatch.setenv("FERJAX_CACHE_DIR", str(cache_dir))
  # A changed file (same size, new content and time) is parsed anew.
  rows = fer_rows(5)
  rows[0] = "6" + rows[0][1:]
  write_csv(path, rows)
  os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
  changed = data_lib.load_fer2013(path)
  assert changed.labels[0] == 6 and first.labels[0] == 0


def test_corrupt_cache_is_rebuilt(tmp_path, cache_dir):
  path = write_csv(tmp_path / "f.csv", fer_rows(3))
  data_lib.load_fer2013(path)
  (cache_file,) = cache_dir.glob("*.npz")
  cache_file.write_bytes(b"not a zip")
  d = data_lib.load_fer2013(path)
  np.testing.assert_array_equal(d.images, _expected_images(3))


def test_a_cache_of_another_version_or_with_inconsistent_arrays_is_rebuilt(tmp_path, cache_dir,
                                                                           caplog):
  path = write_csv(tmp_path / "f.csv", fer_rows(3))
  data_lib.load_fer2013(path)
  (cache_file,) = cache_dir.glob("*.npz")
  with np.load(cache_file) as z:
    arrays = dict(z)
  meta = json.loads(str(arrays["meta"]))
  for changes in ({"meta": np.asarray(json.dumps({**meta, "version": -1}))},
                  {"rows": arrays["rows"][:2]}, {"images": arrays["images"][:, :40]}):
    with open(cache_file, "wb") as f:
      np.savez(f, **{**arrays, **changes})
    caplog.clear()
    with caplog.at_level("WARNING", logger="ferjax.data"):
      d = data_lib.load_fer2013(path)
    np.testing.assert_array_equal(d.images, _expected_images(3))
    assert "ignoring unreadable cache" in caplog.text


def _ferplus_csv(path, rows):
  header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
  with open(path, "w") as f:
    f.write(header + "\n" + "\n".join(rows) + "\n")
  return path


def test_ferplus_majority_rules(tmp_path):
  path = _ferplus_csv(tmp_path / "fer2013new.csv", [
      "Training,fer0000000.png,4,0,0,1,5,0,0,0,0,0",   # anger 5 of 9 after dropping the lone vote
      "Training,fer0000001.png,5,5,0,0,0,0,0,0,0,0",   # tie: no majority
      "PublicTest,fer0000002.png,0,0,0,0,0,0,0,0,2,8",  # not a face
      "PrivateTest,,10,0,0,0,0,0,0,0,0,0",              # no image name: dropped
      "Training,fer0000004.png,1,1,1,0,0,0,0,7,0,0",   # contempt after outlier removal
  ])
  fp = data_lib.load_ferplus(path)
  assert fp.labels.tolist() == [0, -1, -1, -1, 7]
  np.testing.assert_allclose(fp.soft_labels[0, [0, 6]], [5 / 9, 4 / 9])
  assert fp.soft_labels[1].sum() == 0
  np.testing.assert_allclose(fp.soft_labels[4], np.eye(8)[7])
  assert fp.votes.shape == (5, 10)


def test_ferplus_joins_by_row(tmp_path, cache_dir):
  usages = ["Training", "Training", "PublicTest", "PrivateTest", "Training"]
  csv_path = write_csv(tmp_path / "f.csv", [f"0,{pixel_string(i)},{u}" for i, u in enumerate(usages)])
  fp_path = _ferplus_csv(tmp_path / "fp.csv", [
      "Training,a.png,0,10,0,0,0,0,0,0,0,0",
      "Training,a.png,0,0,0,0,0,0,0,0,0,10",  # duplicate name, different row: keyed by row
      "PublicTest,b.png,0,0,10,0,0,0,0,0,0,0",
      "PrivateTest,c.png,10,0,0,0,0,0,0,0,0,0",
      "Training,d.png,0,0,0,0,0,0,10,0,0,0",
  ])
  d = data_lib.with_ferplus_labels(data_lib.load_fer2013(csv_path), data_lib.load_ferplus(fp_path))
  assert d.class_names == data_lib.FERPLUS_CLASSES
  assert d.labels.tolist() == [3, 5, 6, 2]
  assert d.rows.tolist() == [0, 2, 3, 4]
  np.testing.assert_array_equal(d.images[1], _expected_images(3)[2])
  assert d.soft_labels.shape == (4, 8)


def test_ferplus_misaligned_usage_is_an_error(tmp_path, cache_dir):
  csv_path = write_csv(tmp_path / "f.csv", fer_rows(2, usages=("Training",)))
  fp_path = _ferplus_csv(tmp_path / "fp.csv", ["Training,a.png,10,0,0,0,0,0,0,0,0,0",
                                               "PublicTest,b.png,10,0,0,0,0,0,0,0,0,0"])
  with pytest.raises(DataError, match="not row-aligned") as e:
    data_lib.with_ferplus_labels(data_lib.load_fer2013(csv_path), data_lib.load_ferplus(fp_path))
  # Both files are named, each with the line that disagrees (row 1 is line 3 in both).
  assert e.value.path == csv_path and e.value.line == 3
  assert f"'Training' here but 'PublicTest' on line 3 of {fp_path}" in e.value.reason


def test_a_short_ferplus_file_is_named_as_the_short_one(tmp_path, cache_dir):
  csv_path = write_csv(tmp_path / "f.csv", fer_rows(3, usages=("Training",)))
  fp_path = _ferplus_csv(tmp_path / "fp.csv", ["Training,a.png,10,0,0,0,0,0,0,0,0,0"] * 2)
  with pytest.raises(DataError) as e:
    data_lib.with_ferplus_labels(data_lib.load_fer2013(csv_path), data_lib.load_ferplus(fp_path))
  assert e.value.path == csv_path and e.value.line == 4  # Data row 2, the first FER+ lacks.
  assert e.value.reason.startswith(f"{fp_path} has 2 data rows")


def test_ferplus_api_mistakes_are_named(tmp_path, cache_dir):
  # Before: a folder raised a bare IsADirectoryError, a path for the labels an AttributeError.
  folder = tmp_path / "FERPlus"
  folder.mkdir()
  with pytest.raises(DataError, match="is a folder; give the fer2013new.csv file inside it") as e:
    data_lib.load_ferplus(folder)
  assert e.value.path == str(folder)
  # FER2013 itself given as the FER+ file: gzip bytes were quoted, hundreds of them.
  gz = tmp_path / "fer2013.csv.gz"
  gz.write_bytes(gzip.compress(b"emotion,pixels,Usage\n"))
  with pytest.raises(DataError, match=r":1: unexpected header \(found: gzip data, not CSV "
                     r"text\); expected usage,image name,neutral,"):
    data_lib.load_ferplus(gz)
  csv_path = write_csv(tmp_path / "f.csv", fer_rows(2, usages=("Training",)))
  fp_path = _ferplus_csv(tmp_path / "fp.csv", ["Training,a.png,10,0,0,0,0,0,0,0,0,0"] * 2)
  data, fp = data_lib.load_fer2013(csv_path), data_lib.load_ferplus(fp_path)
  with pytest.raises(TypeError, match="got FerData and str"):
    data_lib.with_ferplus_labels(data, str(fp_path))
  with pytest.raises(TypeError, match="got FerPlusLabels and FerData"):
    data_lib.with_ferplus_labels(fp, data)
  assert data_lib.with_ferplus_labels(data, fp).labels.tolist() == [6, 6]


def test_ferplus_after_with_held_out_names_the_new_split(tmp_path, cache_dir):
  csv_path = write_csv(tmp_path / "f.csv", fer_rows(20, usages=("Training",)))
  fp_path = _ferplus_csv(tmp_path / "fp.csv", ["Training,a.png,10,0,0,0,0,0,0,0,0,0"] * 20)
  held = data_lib.load_fer2013(csv_path).with_held_out("Training", "val", 0.2)
  # Before: "load the CSV form of FER2013, not an image folder", though it was the CSV.
  with pytest.raises(DataError, match=r"has the split\(s\) val, not Training, PublicTest, "
                     r"PrivateTest: load the CSV form of FER2013, and relabel it before making "
                     r"new splits \(with_held_out\)"):
    data_lib.with_ferplus_labels(held, data_lib.load_ferplus(fp_path))


def test_real_fer2013_counts(fer2013_path):
  d = data_lib.load_fer2013(fer2013_path)
  assert d.images.shape == (35887, 48, 48, 1)
  assert {s: int((d.splits == s).sum()) for s in d.split_names} == {
      "Training": 28709, "PublicTest": 3589, "PrivateTest": 3589}
  assert d.class_counts().tolist() == [4953, 547, 5121, 8989, 6077, 4002, 6198]
  assert not d.skipped


def test_real_ferplus_joins_the_real_fer2013_by_row(fer2013_path, ferplus_path):
  # The FER+ readers were tested on hand-made files only; FERPLUS_PATH was never read.
  fer = data_lib.load_fer2013(fer2013_path)
  d = data_lib.with_ferplus_labels(fer, data_lib.load_ferplus(ferplus_path))
  assert d.class_names == data_lib.FERPLUS_CLASSES
  assert set(np.unique(d.labels)) == set(range(8))
  # The file's first eight rows, worked by hand (columns neutral, happiness, surprise,
  # sadness, anger, disgust, fear, contempt, unknown, NF; single votes dropped):
  # 0: 4,0,0,1,3,2,... neutral 4 of 9, no majority; 1: 6,0,1,1,...,2 unknown: neutral 6 of 8;
  # 2: neutral 5 of 8; 3: neutral 4 and sadness 4, a tie; 4: neutral 9; 5: neutral 6 of 6;
  # 6: sadness 8 of 10; 7: happiness 10.
  assert d.rows[:6].tolist() == [1, 2, 4, 5, 6, 7]
  assert d.labels[:6].tolist() == [6, 6, 6, 6, 4, 3]  # neutral x4, sad, happy
  np.testing.assert_array_equal(d.images[:6], fer.images[[1, 2, 4, 5, 6, 7]])
  np.testing.assert_array_equal(d.splits, fer.splits[d.rows])
  # The 173 rows without an image name (no face in FER+) are among those dropped.
  with open(ferplus_path) as f:
    unnamed = {i for i, line in enumerate(f.read().splitlines()[1:]) if line.split(",")[1] == ""}
  assert len(unnamed) == 173 and not unnamed & set(d.rows.tolist())
  # README's FER+ paragraph: Training 25,060 rows, PublicTest 3,199, PrivateTest 3,153.
  assert {s: len(d.split(s)) for s in data_lib.CSV_SPLITS} == {
      "Training": 25060, "PublicTest": 3199, "PrivateTest": 3153}


def test_a_ferplus_file_for_a_fer2013_run_is_named_unused(tmp_path, cache_dir, caplog):
  # evaluate --ferplus=... on a FER2013 run evaluated its 7 classes without a word.
  from ferjax.config import default_config
  from ferjax.splits import load_run_data

  path = write_csv(tmp_path / "fer.csv", fer_rows(4))
  with caplog.at_level("WARNING"):
    data = load_run_data(default_config("dnn"), str(path), ferplus_path="votes.csv")
  assert len(data.class_names) == 7
  assert "--ferplus=votes.csv is not used: this run has fer2013 labels, not FER+" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    load_run_data(default_config("dnn"), str(path))
  assert "ferplus" not in caplog.text.lower()
