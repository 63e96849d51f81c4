"""FER2013 and FER+ readers: every form people download, validated and cached.

FER2013 comes as Kaggle's ``fer2013.csv`` (plain or gzipped), Kaggle's
``fer2013.tar.gz`` holding ``fer2013/fer2013.csv``, or an image-folder
re-upload (``train/<emotion>/*.png``, ``test/<emotion>/*.png``). All of them load
into one :class:`FerData`: uint8 images ``(N, 48, 48, 1)``, int32 labels in
FER2013's order and the split of every example.

The CSV parser is vectorised per chunk of rows (numpy's C tokenizer), and a
validated cache keyed on the source file makes the next load near-instant.
Malformed input raises :class:`ferjax.errors.DataError` naming the file and the
1-based line; ``on_error="skip"`` drops bad rows instead and records them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Sequence

import numpy as np

from ferjax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# FER+ keeps FER2013's order for the shared emotions and adds contempt as 7.
FERPLUS_CLASSES = FER2013_CLASSES + ("contempt",)
CSV_SPLITS = ("Training", "PublicTest", "PrivateTest")
FOLDER_SPLITS = ("train", "test")

# Class folder names used by the image-folder re-uploads, both spellings.
_FOLDER_CLASSES = {
    "angry": 0, "anger": 0,
    "disgust": 1, "disgusted": 1,
    "fear": 2, "fearful": 2,
    "happy": 3, "happiness": 3,
    "sad": 4, "sadness": 4,
    "surprise": 5, "surprised": 5,
    "neutral": 6,
}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_EMOTION_CODES = {str(i).encode(): i for i in range(len(FER2013_CLASSES))}
_USAGE_CODES = {name.encode(): i for i, name in enumerate(CSV_SPLITS)}
_CHUNK_ROWS = 2048
# Bump when parsing changes what a source file loads as, so old caches retire.
_CACHE_VERSION = 2  # 2: csv_rows.
_FINGERPRINT_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class FerData:
  """Faces with labels and split names, as loaded from one source.

  Attributes:
    images: uint8 ``(N, 48, 48, 1)``.
    labels: int32 ``(N,)``, indices into ``class_names``.
    splits: ``(N,)`` str, the split of each example (``Training``,
      ``PublicTest``, ``PrivateTest``; ``train``/``test`` for image folders).
    rows: int32 ``(N,)``, 0-based data row in ``fer2013.csv`` (the key FER+
      joins on), or the position in the folder listing for image folders.
    csv_rows: whether ``rows`` are ``fer2013.csv`` data rows (False for image
      folders, even those whose file names carry the CSV's split names).
    class_names: names of the label indices.
    source: where the data came from.
    soft_labels: float32 ``(N, C)`` vote distributions (FER+ only) or None.
    skipped: a :class:`DataError` (path, line, reason) for every bad row or file
      dropped with ``on_error="skip"``.
  """

  images: np.ndarray
  labels: np.ndarray
  splits: np.ndarray
  rows: np.ndarray
  class_names: tuple[str, ...] = FER2013_CLASSES
  source: str = ""
  soft_labels: np.ndarray | None = None
  skipped: tuple[DataError, ...] = ()
  csv_rows: bool = True

  def __post_init__(self):
    # Checked here for a FerData made by hand from one's own arrays: a wrong shape or an
    # out-of-range label would otherwise fail deep in training or in the metrics (an
    # unpacking error, an IndexError). Lists are taken as arrays.
    for name in ("images", "labels", "splits", "rows"):
      object.__setattr__(self, name, np.asarray(getattr(self, name)))
    where = self.source or "FerData"
    if self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1) or self.images.dtype != np.uint8:
      raise DataError(f"images must be uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1) grey faces, "
                      f"got {self.images.dtype} {self.images.shape}", path=where)
    n = len(self.images)
    for name in ("labels", "splits", "rows"):
      shape = getattr(self, name).shape
      if shape != (n,):
        raise DataError(f"{name} must have shape ({n},), one per image, got {shape}", path=where)
    if not np.issubdtype(self.labels.dtype, np.integer) and n:
      raise DataError(f"labels must be integers (class indices), got {self.labels.dtype}",
                      path=where)
    if n and not 0 <= self.labels.min() <= self.labels.max() < len(self.class_names):
      raise DataError(f"labels must lie in 0..{len(self.class_names) - 1} (class_names "
                      f"{', '.join(self.class_names)}), got {self.labels.min()}.."
                      f"{self.labels.max()}", path=where)
    if self.soft_labels is not None:
      # Checked here: a mismatched array fails only in training, as an IndexError in a batch.
      soft = np.asarray(self.soft_labels)
      if soft.shape != (n, len(self.class_names)) or not np.issubdtype(soft.dtype, np.floating):
        raise DataError(f"soft_labels must be float (N, C) = ({n}, {len(self.class_names)}), one "
                        f"distribution over class_names per image, got {soft.dtype} {soft.shape}",
                        path=where)
      object.__setattr__(self, "soft_labels", soft)

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    # One line: the dataclass default prints every array, pages of pixels for FER2013.
    parts = [f"{len(self)} faces", f"{self.num_classes} classes"]
    parts += [f"{name} {int(np.sum(self.splits == name))}" for name in self.split_names]
    if self.soft_labels is not None:
      parts.append("soft labels")
    if self.skipped:
      parts.append(f"{len(self.skipped)} rows skipped")
    return f"FerData({', '.join(parts)}, source={self.source!r})"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def split_names(self) -> tuple[str, ...]:
    """The split names present, in canonical order."""
    present = set(np.unique(self.splits).tolist())
    order = [s for s in CSV_SPLITS + FOLDER_SPLITS if s in present]
    return tuple(order + sorted(present - set(order)))

  def select(self, index: np.ndarray) -> FerData:
    """Returns the examples at ``index`` (a boolean mask or integer indices)."""
    soft = None if self.soft_labels is None else self.soft_labels[index]
    return dataclasses.replace(
        self, images=self.images[index], labels=self.labels[index],
        splits=self.splits[index], rows=self.rows[index], soft_labels=soft)

  def split(self, name: str) -> FerData:
    """Returns the examples of one split, e.g. ``data.split("PublicTest")``."""
    mask = self.splits == name
    if not mask.any():
      raise DataError(
          f"no split named {name!r}; this data has {', '.join(self.split_names)}",
          path=self.source)
    return self.select(mask)

  def with_held_out(self, source: str, name: str, fraction: float, seed: int = 0) -> FerData:
    """Moves a stratified random ``fraction`` of split ``source`` into a new split ``name``.

    Each class gives up ``round(fraction * its count)`` examples (at least one
    when it has two or more), drawn with ``seed``; the same data, fraction and
    seed always give the same split.
    """
    if not 0 < fraction < 1:
      raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if name in self.split_names:
      raise DataError(f"this data already has a split named {name!r}", path=self.source)
    index = np.flatnonzero(self.splits == source)
    if not len(index):
      raise DataError(f"no split named {source!r}; this data has {', '.join(self.split_names)}",
                      path=self.source)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(self.labels[index]):
      members = index[self.labels[index] == label]
      take = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
      chosen.append(rng.choice(members, size=take, replace=False) if take > 0 else members[:0])
    splits = self.splits.astype(object)
    splits[np.concatenate(chosen)] = name
    return dataclasses.replace(self, splits=splits.astype(str))

  def class_counts(self) -> np.ndarray:
    """Examples per class, int64 ``(num_classes,)``."""
    return np.bincount(self.labels, minlength=self.num_classes)


# ----------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------


def default_cache_dir() -> str:
  """``$FERJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/ferjax``, else ``~/.cache/ferjax``."""
  if os.environ.get("FERJAX_CACHE_DIR"):
    return os.environ["FERJAX_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ferjax")


def fer2013_path(data_path: str | os.PathLike | None) -> str | os.PathLike:
  """The FER2013 to load: ``data_path``, else ``$FER2013_PATH``.

  Raises:
    ConfigError: neither is set (the message names the ``--data`` flag).
  """
  data_path = data_path or os.environ.get("FER2013_PATH")
  if not data_path:
    raise ConfigError("no data: pass --data=PATH/TO/fer2013.csv (or .csv.gz, .tar.gz, an "
                      "image folder) or set FER2013_PATH")
  return data_path


def load_fer2013(
    path: str | os.PathLike,
    *,
    on_error: str = "raise",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FerData:
  """Loads FER2013 from any of the forms it is distributed in.

  Args:
    path: ``fer2013.csv``, ``fer2013.csv.gz``, Kaggle's ``fer2013.tar.gz`` (or
      ``.tar``), or an image-folder root holding ``train/`` and ``test/``.
    on_error: ``"raise"`` (default) raises :class:`DataError` at the first bad
      row; ``"skip"`` drops bad rows, logs how many and which lines, and lists
      them in ``FerData.skipped``.
    cache: read from / write to the parse cache.
    cache_dir: where the cache lives (default :func:`default_cache_dir`).

  Returns:
    The whole data set as a :class:`FerData`.

  Raises:
    DataError: the path does not exist or its content is malformed.
    ValueError: ``on_error`` is neither ``"raise"`` nor ``"skip"``.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
  _check_path_type(path, "fer2013.csv (or .csv.gz, .tar.gz, an image folder)",
                   "; ferjax.data.fer2013_path(None) reads $FER2013_PATH and says when it is unset")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError("no such file or directory", path=path)
  key = _fingerprint(path, on_error) if cache else None
  cache_file = data = None
  if key is not None:
    cache_file = os.path.join(os.fspath(cache_dir or default_cache_dir()), f"fer2013-{key}.npz")
    data = _read_cache(cache_file, path)
  parsed = data is None
  if parsed:
    if os.path.isdir(path):
      data = _load_folder(path, on_error)
    elif _is_tar(path):
      data = _load_tar(path, on_error)
    else:
      data = parse_fer2013_csv(_read_maybe_gzip(path), where=path, on_error=on_error)
  if data.skipped:  # Reported on every load, the cached ones too: the rows are still missing.
    where = ", ".join(str(e.line) if e.line else e.path for e in data.skipped[:20])
    more = ", …" if len(data.skipped) > 20 else ""
    n = len(data.skipped)
    plural = "s" if n != 1 else ""
    log.warning("%s: skipped %d bad row%s (line%s %s%s); first: %s", path, n, plural, plural,
                where, more, data.skipped[0])
  if cache_file is not None and parsed:
    _write_cache(cache_file, data)
  return data


def parse_fer2013_csv(data: bytes, *, where: str = "<bytes>", on_error: str = "raise") -> FerData:
  """Parses the bytes of ``fer2013.csv``.

  Args:
    data: the whole CSV (header ``emotion,pixels,Usage`` in any column order).
    where: the name used in errors.
    on_error: ``"raise"`` or ``"skip"``, as in :func:`load_fer2013`.

  Returns:
    The parsed :class:`FerData`.
  """
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  if b"\r" in data[:NUM_PIXELS * 8]:
    data = data.replace(b"\r\n", b"\n")
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  if not lines:
    raise DataError("the file is empty", path=where)
  columns = [c.strip().lower() for c in lines[0].split(b",")]
  missing = [name for name in ("emotion", "pixels", "usage") if name.encode() not in columns]
  if missing:
    raise DataError(
        f"missing column(s) {', '.join(missing)}; the header must name emotion, pixels "
        f"and Usage (found: {_header_text(lines[0])})", path=where, line=1)
  i_emotion, i_pixels, i_usage = (columns.index(n) for n in (b"emotion", b"pixels", b"usage"))
  body = lines[1:]
  if not body:
    raise DataError("the file has a header but no data rows", path=where, line=1)

  n = len(body)
  images = np.empty((n, NUM_PIXELS), np.uint8)
  labels = np.empty(n, np.int32)
  usage = np.empty(n, np.int8)
  good = np.ones(n, bool)
  bad: list[tuple[int, str]] = []
  for start in range(0, n, _CHUNK_ROWS):
    chunk = body[start:start + _CHUNK_ROWS]
    chunk_bad: list[tuple[int, str]] = []
    ok: list[int] = []
    pixels: list[bytes] = []
    for j, line in enumerate(chunk):
      fields = line.split(b",")
      problem = None
      if len(fields) != len(columns):
        problem = (f"expected {len(columns)} comma-separated fields, found {len(fields)}"
                   + (" (empty line)" if not line.strip() else ""))
      else:
        label = _EMOTION_CODES.get(fields[i_emotion].strip())
        split = _USAGE_CODES.get(fields[i_usage].strip())
        if label is None:
          problem = f"unknown emotion {_show(fields[i_emotion])}; expected an integer 0..6"
        elif split is None:
          problem = (f"unknown Usage {_show(fields[i_usage])}; expected one of "
                     f"{', '.join(CSV_SPLITS)}")
        else:
          labels[start + j] = label
          usage[start + j] = split
      if problem:
        chunk_bad.append((start + j + 2, problem))
      else:
        ok.append(start + j)
        pixels.append(fields[i_pixels])
    if pixels:
      parsed = _parse_pixel_chunk(pixels)
      if parsed is not None:
        images[ok] = parsed
      else:  # Find exactly which rows are bad; only runs on malformed input.
        for row, text in zip(ok, pixels):
          values, problem = _parse_pixel_row(text)
          if problem:
            chunk_bad.append((row + 2, problem))
          else:
            images[row] = values
    if chunk_bad:
      chunk_bad.sort()
      if on_error == "raise":
        line, problem = chunk_bad[0]
        raise DataError(problem, path=where, line=line)
      bad.extend(chunk_bad)
      good[[line - 2 for line, _ in chunk_bad]] = False

  rows = np.arange(n, dtype=np.int32)
  if bad:
    if not good.any():
      raise DataError(f"all {n} data rows are malformed; first: {bad[0][1]}",
                      path=where, line=bad[0][0])
    images, labels, usage, rows = images[good], labels[good], usage[good], rows[good]
  return FerData(
      images=images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1),
      labels=labels,
      splits=np.asarray(CSV_SPLITS)[usage],
      rows=rows,
      source=where,
      skipped=tuple(DataError(problem, path=where, line=line) for line, problem in bad),
  )


# ----------------------------------------------------------------------------
# FER+
# ----------------------------------------------------------------------------

# fer2013new.csv vote columns, in file order, mapped to FERPLUS_CLASSES indices.
_FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                    "fear", "contempt", "unknown", "nf")
_FERPLUS_TO_FERJAX = np.array([6, 3, 5, 4, 0, 1, 2, 7])


@dataclasses.dataclass(frozen=True)
class FerPlusLabels:
  """FER+ crowd labels, row-aligned with ``fer2013.csv``.

  Attributes:
    votes: int32 ``(N, 10)`` raw votes, columns as in ``fer2013new.csv``
      (neutral, happiness, surprise, sadness, anger, disgust, fear, contempt,
      unknown, NF).
    labels: int32 ``(N,)`` majority label in ``FERPLUS_CLASSES`` order, or -1
      where FER+'s rules drop the row (no image, no majority, unknown or not a
      face).
    soft_labels: float32 ``(N, 8)`` vote distribution over the eight emotions in
      ``FERPLUS_CLASSES`` order, after FER+'s single-vote outlier removal
      (zeros where ``labels`` is -1).
    usage: ``(N,)`` str, the Usage column.
    source: the file they were read from.
  """

  votes: np.ndarray
  labels: np.ndarray
  soft_labels: np.ndarray
  usage: np.ndarray
  source: str = ""


def load_ferplus(path: str | os.PathLike) -> FerPlusLabels:
  """Reads ``fer2013new.csv`` and applies FER+'s majority-vote rules.

  The rules follow FER+'s own reader (Barsoum et al., ICMI 2016): a single vote
  for an emotion counts as noise and is removed; a row is labelled with the
  emotion holding more than half of the remaining votes; rows without such a
  majority, whose majority is "unknown" or "not a face", or whose image name is
  empty (no image in FER+) are dropped.

  Args:
    path: ``fer2013new.csv``.

  Returns:
    The labels, row-aligned with ``fer2013.csv`` (match by row, never by name).

  Raises:
    DataError: the path is missing or a folder, or the file is malformed.
  """
  _check_path_type(path, "fer2013new.csv")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError("no such file", path=path)
  if os.path.isdir(path):  # open() would raise a bare IsADirectoryError.
    raise DataError("is a folder; give the fer2013new.csv file inside it", path=path)
  with open(path, "rb") as f:
    lines = f.read().replace(b"\r\n", b"\n").split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  if not lines:
    raise DataError("the file is empty", path=path)
  header = [c.strip().lower().decode("ascii", "replace") for c in lines[0].split(b",")]
  expected = ["usage", "image name", *_FERPLUS_COLUMNS]
  if header != expected:
    raise DataError(f"unexpected header (found: {_header_text(lines[0])}); expected "
                    f"{','.join(expected)}", path=path, line=1)
  n = len(lines) - 1
  votes = np.zeros((n, 10), np.int32)
  usage = np.empty(n, object)
  has_image = np.zeros(n, bool)
  for i, line in enumerate(lines[1:]):
    fields = line.split(b",")
    if len(fields) != 12:
      raise DataError(f"expected 12 fields, found {len(fields)}", path=path, line=i + 2)
    try:
      votes[i] = [int(v) for v in fields[2:]]
    except ValueError:
      raise DataError(f"vote counts must be integers: {_show(line[:80])}", path=path,
                      line=i + 2) from None
    usage[i] = fields[0].strip().decode("ascii", "replace")
    has_image[i] = bool(fields[1].strip())
  if (votes < 0).any():
    line = int(np.argwhere(votes < 0)[0, 0]) + 2
    raise DataError("negative vote count", path=path, line=line)

  kept = np.where(votes > 1, votes, 0)  # FER+: a lone vote is an outlier.
  total = kept.sum(axis=1)
  peak = kept.argmax(axis=1)
  majority = kept.max(axis=1) > 0.5 * total
  valid = has_image & majority & (peak < 8)
  labels = np.where(valid, _FERPLUS_TO_FERJAX[np.minimum(peak, 7)], -1).astype(np.int32)
  emotions = kept[:, :8].astype(np.float32)
  soft = np.zeros((n, 8), np.float32)
  soft[:, _FERPLUS_TO_FERJAX] = emotions / np.maximum(emotions.sum(axis=1, keepdims=True), 1)
  soft[~valid] = 0
  return FerPlusLabels(votes=votes, labels=labels, soft_labels=soft, usage=usage.astype(str),
                       source=path)


def with_ferplus_labels(data: FerData, ferplus: FerPlusLabels) -> FerData:
  """Relabels FER2013 with FER+ majority votes, dropping the rows FER+ drops.

  Args:
    data: FER2013 loaded from the CSV (its ``rows`` index ``fer2013new.csv``).
    ferplus: labels from :func:`load_ferplus`.

  Returns:
    The kept examples with 8-class labels and soft vote distributions.

  Raises:
    TypeError: the arguments are not a FerData and FerPlusLabels (e.g. a path).
    DataError: the data is not from the CSV, or the files are not row-aligned.
  """
  # A path for ferplus (or swapped arguments) would fail below as an AttributeError.
  if not isinstance(data, FerData) or not isinstance(ferplus, FerPlusLabels):
    raise TypeError(f"with_ferplus_labels(data, ferplus) takes a FerData from load_fer2013 and "
                    f"the FerPlusLabels from load_ferplus, got {type(data).__name__} and "
                    f"{type(ferplus).__name__}")
  if not data.csv_rows:
    raise DataError("FER+ labels join on fer2013.csv row order; load the CSV form of "
                    "FER2013, not an image folder", path=data.source)
  others = sorted(set(np.unique(data.splits).tolist()) - set(CSV_SPLITS))
  if others:  # E.g. a split made by with_held_out: its rows' Usage cannot be checked.
    raise DataError(f"FER+ labels are checked against fer2013.csv's Usage column, but this data "
                    f"has the split(s) {', '.join(others)}, not {', '.join(CSV_SPLITS)}: load "
                    "the CSV form of FER2013, and relabel it before making new splits "
                    "(with_held_out)", path=data.source)
  ferplus_file = ferplus.source or "the FER+ labels"
  if len(data) and data.rows.max() >= len(ferplus.labels):
    raise DataError(f"{ferplus_file} has {len(ferplus.labels)} data rows, but this file has "
                    f"data row {int(data.rows.max())}; are these the same release?",
                    path=data.source, line=int(data.rows.max()) + 2)
  mismatch = ferplus.usage[data.rows] != data.splits
  if mismatch.any():
    row = int(data.rows[np.argmax(mismatch)])
    raise DataError(f"Usage {str(data.splits[np.argmax(mismatch)])!r} here but "
                    f"{str(ferplus.usage[row])!r} on line {row + 2} of {ferplus_file}; the files "
                    "are not row-aligned", path=data.source, line=row + 2)
  labels = ferplus.labels[data.rows]
  keep = labels >= 0
  out = data.select(keep)
  return dataclasses.replace(out, labels=labels[keep], class_names=FERPLUS_CLASSES,
                             soft_labels=ferplus.soft_labels[data.rows][keep])


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def _check_path_type(path, what: str, none_hint: str = "") -> None:
  """ConfigError unless ``path`` is a path; os.fspath's TypeError named no argument.

  None is the usual slip: ``os.environ.get("FER2013_PATH")`` with the variable unset.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise ConfigError(f"path must be the path of {what}, got {path!r}"
                      + (none_hint if path is None else ""))


def _header_text(line: bytes, limit: int = 120) -> str:
  """A file's first line as an error quotes it: binary data said to be so, a long line cut.

  A video, an archive or a checkpoint given as the data put hundreds of undecodable
  bytes into the one-line error.
  """
  head = line[:limit]
  if head.startswith(b"\x1f\x8b"):
    return "gzip data, not CSV text"
  if b"\x00" in head or sum(b < 32 and b != 9 or b > 126 for b in head) > len(head) // 10:
    return "binary data, not CSV text"
  text = head.decode("ascii", "replace")
  return text + "…" if len(line) > limit else text


def _read_maybe_gzip(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  if not raw:
    raise DataError("the file is empty", path=path)
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    data = _gunzip(raw)
  except (EOFError, OSError, zlib.error, ValueError) as e:
    raise _gzip_error(path, raw, e) from None
  if not data:
    raise DataError("the gzip stream decompresses to nothing", path=path)
  return data


def _gunzip(raw: bytes) -> bytes:
  try:
    from isal import igzip  # ISA-L: ~4x faster than zlib on this data.
  except ImportError:
    return gzip.decompress(raw)
  return igzip.decompress(raw)


def _gzip_error(path: str, raw: bytes, error: Exception) -> DataError:
  """Says where a gzip stream breaks: at which line of the CSV it is cut off."""
  decoder = zlib.decompressobj(wbits=31)
  try:
    partial = decoder.decompress(raw)
  except zlib.error as e:
    return DataError(f"not a valid gzip file ({e})", path=path)
  if not decoder.eof:
    line = partial.count(b"\n") + 1
    return DataError(f"the gzip stream is truncated: it ends inside line {line} of the CSV "
                     f"after {len(partial):,} bytes; the file is incomplete, download it again",
                     path=path, line=line)
  return DataError(f"not a valid gzip file ({error})", path=path)


def _is_tar(path: str) -> bool:
  if path.endswith((".tar", ".tar.gz", ".tgz")):
    return True
  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False


def _load_tar(path: str, on_error: str) -> FerData:
  try:
    with tarfile.open(path, "r:*") as tar:
      members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".csv")]
      wanted = [m for m in members if os.path.basename(m.name) == "fer2013.csv"] or members
      if not wanted:
        raise DataError("the archive holds no fer2013.csv", path=path)
      member = wanted[0]
      data = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(f"cannot read the tar archive ({e}); is it complete?", path=path) from None
  return parse_fer2013_csv(data, where=f"{path}!/{member.name}", on_error=on_error)


def _load_folder(root: str, on_error: str) -> FerData:
  import cv2  # Imported here: only the folder form needs OpenCV.

  split_dirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
  splits_found = [s for s in FOLDER_SPLITS if s in split_dirs]
  if not splits_found:
    raise DataError("an image-folder FER2013 needs train/ and/or test/ subfolders, each with "
                    "one folder per emotion", path=root)
  images, labels, splits, skipped = [], [], [], []
  for split in splits_found:
    split_dir = os.path.join(root, split_dirs[split])
    for class_dir in sorted(os.listdir(split_dir)):
      full = os.path.join(split_dir, class_dir)
      if class_dir.startswith(".") or not os.path.isdir(full):
        continue
      label = _FOLDER_CLASSES.get(class_dir.lower())
      if label is None:
        raise DataError(f"unknown emotion folder {class_dir!r}; expected one of "
                        f"{', '.join(sorted(_FOLDER_CLASSES))}", path=full)
      for name in sorted(os.listdir(full), key=_natural_key):
        file = os.path.join(full, name)
        if name.startswith(".") or os.path.isdir(file):
          continue
        problem = None
        image = None
        if not name.lower().endswith(_IMAGE_EXTENSIONS):
          problem = "not an image file (expected .png or .jpg)"
        else:
          image = cv2.imdecode(np.fromfile(file, np.uint8), cv2.IMREAD_GRAYSCALE)
          if image is None:
            problem = "cannot decode this image"
          elif image.shape != (IMAGE_SIZE, IMAGE_SIZE):
            problem = f"image is {image.shape[1]}x{image.shape[0]}, expected 48x48"
        if problem:
          if on_error == "raise":
            raise DataError(problem, path=file)
          skipped.append(DataError(problem, path=file))
          continue
        images.append(image)
        labels.append(label)
        # msambare-style names keep the original split: PublicTest_123.jpg.
        prefix = name.split("_", 1)[0]
        splits.append(prefix if prefix in CSV_SPLITS else split)
  if not images:
    raise DataError("no images found", path=root)
  return FerData(
      images=np.stack(images)[..., None],
      labels=np.asarray(labels, np.int32),
      splits=np.asarray(splits),
      rows=np.arange(len(images), dtype=np.int32),
      source=root,
      skipped=tuple(skipped),
      csv_rows=False,
  )


def _parse_pixel_chunk(pixels: Sequence[bytes]) -> np.ndarray | None:
  """Parses many pixel fields at once; None if any is malformed."""
  text = b"\n".join(pixels)
  if text.translate(None, b"0123456789 \n"):
    return None
  try:
    values = np.loadtxt(io.BytesIO(text), dtype=np.int16, delimiter=" ", comments=None,
                        ndmin=2, encoding=None)
  except (ValueError, OverflowError):
    return None
  if values.shape != (len(pixels), NUM_PIXELS) or values.max(initial=0) > 255:
    return None
  return values


def _parse_pixel_row(text: bytes) -> tuple[np.ndarray | None, str | None]:
  """Parses one pixel field, or says exactly what is wrong with it."""
  tokens = text.split(b" ") if text.strip() else []
  if b"" in tokens:
    k = tokens.index(b"")
    where = "a leading space" if k == 0 else f"pixel {k + 1} is empty (two spaces in a row" + (
        " or a trailing space)" if k == len(tokens) - 1 else ")")
    return None, f"malformed pixel list: {where}"
  if len(tokens) != NUM_PIXELS:
    return None, f"expected {NUM_PIXELS} pixel values (48x48), found {len(tokens)}"
  for k, token in enumerate(tokens):
    if not token.isdigit() or int(token) > 255:
      return None, f"pixel {k + 1} is {_show(token)}, not an integer in 0..255"
  return np.array(tokens).astype(np.uint8), None


def _show(value: bytes) -> str:
  return repr(value.decode("ascii", "replace"))


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------


def _fingerprint(path: str, on_error: str) -> str:
  """A key that changes whenever the source changes.

  Files: size, modification time and the first and last MiB of content.
  Folders: the relative path, size and modification time of every file.
  """
  h = hashlib.sha256(f"v{_CACHE_VERSION}:{on_error}:".encode())
  if os.path.isdir(path):
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        st = os.stat(os.path.join(dirpath, name))
        rel = os.path.relpath(os.path.join(dirpath, name), path)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  else:
    st = os.stat(path)
    h.update(f"file:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
      h.update(f.read(_FINGERPRINT_BYTES))
      if st.st_size > 2 * _FINGERPRINT_BYTES:
        f.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
        h.update(f.read())
  return h.hexdigest()[:24]


def _read_cache(cache_file: str, source: str) -> FerData | None:
  if not os.path.exists(cache_file):
    return None
  try:
    with np.load(cache_file, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      if meta.get("version") != _CACHE_VERSION:
        raise ValueError(f"version {meta.get('version')}, not {_CACHE_VERSION}")
      # FerData checks the arrays' shapes and dtypes: inconsistent content raises there.
      return FerData(
          images=z["images"], labels=z["labels"], splits=z["splits"], rows=z["rows"],
          class_names=tuple(meta["class_names"]), source=source, csv_rows=meta["csv_rows"],
          skipped=tuple(DataError(reason, path=p, line=line) for p, line, reason in meta["skipped"]))
  except Exception as e:  # A broken cache is rebuilt, never trusted.
    log.warning("ignoring unreadable cache %s (%s); parsing the source again", cache_file, e)
    return None


def _write_cache(cache_file: str, data: FerData) -> None:
  meta = {"version": _CACHE_VERSION, "class_names": list(data.class_names),
          "skipped": [[e.path, e.line, e.reason] for e in data.skipped], "source": data.source,
          "csv_rows": data.csv_rows}
  try:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_file), suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, images=data.images, labels=data.labels, splits=data.splits,
                 rows=data.rows, meta=np.asarray(json.dumps(meta)))
      os.replace(tmp, cache_file)  # Atomic: readers never see half a file.
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError as e:
    log.warning("could not write the FER2013 cache %s (%s); the next load parses again",
                cache_file, e)
