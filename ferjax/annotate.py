"""Drawing results on frames and writing them out: annotated video or images, CSV, JSON.

:func:`draw_results` draws boxes, labels and probability bars on a copy of a
frame; the writers save annotated frames and per-face rows; and
:func:`display_available` says whether a window can be shown here.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ferjax.errors import ConfigError, FerjaxError
from ferjax.sources import cv_path

if TYPE_CHECKING:  # Annotations only: ferjax.video imports this module.
  from ferjax.video import FaceResult, FrameResult

# Both encoders are built into opencv-python-headless's FFmpeg (checked headless, OpenCV 4.14).
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
# Image formats OpenCV writes in grey only: their annotated copies are written grey.
GREY_ONLY_EXTENSIONS = (".pgm",)


class OutputError(FerjaxError):
  """An output file (annotated video or images, CSV, JSON) cannot be written."""


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------

_GREEN = (80, 200, 80)
_GREY = (170, 170, 170)
_DARK = (40, 40, 40)
_WHITE = (255, 255, 255)
_FONT_SCALE = 0.4
_BAR_W = 70
_ROW_H = 12


def draw_results(frame: np.ndarray, faces: Sequence[FaceResult], class_names: Sequence[str], *,
                 fps: float | None = None) -> np.ndarray:
  """Draws boxes, track number and top label, and a probability bar per emotion by each face.

  Args:
    frame: uint8 BGR or grey frame (not modified).
    faces: the frame's results.
    class_names: names for the bars, in probability order.
    fps: if given, written in the top-left corner.

  Returns:
    An annotated BGR copy of ``frame``.
  """
  import cv2

  font = cv2.FONT_HERSHEY_SIMPLEX
  out = np.ascontiguousarray(frame)
  if out.ndim == 2 or out.shape[2] == 1:
    out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
  elif out.shape[2] == 4:
    out = cv2.cvtColor(out, cv2.COLOR_BGRA2BGR)
  else:
    out = out.copy()
  height, width = out.shape[:2]
  label_w = max(cv2.getTextSize(n, font, _FONT_SCALE, 1)[0][0] for n in class_names) + 4
  panel_w = label_w + _BAR_W + 40
  panel_h = _ROW_H * len(class_names) + 4
  for face in faces:
    x, y, w, h = face.box
    cv2.rectangle(out, (x, y), (x + w, y + h), _GREEN, 2)
    text = ("" if face.track is None else f"#{face.track} ") + f"{face.label} {face.score:.2f}"
    (tw, th), _ = cv2.getTextSize(text, font, 0.55, 1)
    ty = y - 6 if y - th - 8 >= 0 else y + h + th + 6
    cv2.rectangle(out, (x, ty - th - 4), (x + tw + 4, ty + 4), _DARK, -1)
    cv2.putText(out, text, (x + 2, ty), font, 0.55, _WHITE, 1, cv2.LINE_AA)
    # The bars sit right of the box, or left of it when there is no room.
    px = x + w + 6 if x + w + 6 + panel_w <= width else max(0, x - 6 - panel_w)
    py = min(max(0, y), max(0, height - panel_h))
    overlay = out[py:py + panel_h, px:px + panel_w]
    overlay[:] = (overlay * 0.4).astype(np.uint8)  # Darken behind the bars, keep the scene visible.
    for i, (name, p) in enumerate(zip(class_names, face.probs)):
      row_y = py + 2 + i * _ROW_H
      cv2.putText(out, name, (px + 2, row_y + _ROW_H - 3), font, _FONT_SCALE, _WHITE, 1,
                  cv2.LINE_AA)
      bx = px + label_w
      color = _GREEN if i == face.label_index else _GREY
      cv2.rectangle(out, (bx, row_y + 2), (bx + int(round(_BAR_W * float(p))), row_y + _ROW_H - 2),
                    color, -1)
      cv2.putText(out, f"{float(p):.2f}", (bx + _BAR_W + 3, row_y + _ROW_H - 3), font,
                  _FONT_SCALE, _WHITE, 1, cv2.LINE_AA)
  if fps is not None:
    cv2.putText(out, f"{fps:.1f} FPS", (8, 20), font, 0.6, _DARK, 3, cv2.LINE_AA)
    cv2.putText(out, f"{fps:.1f} FPS", (8, 20), font, 0.6, _WHITE, 1, cv2.LINE_AA)
  return out


# ----------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------


def _partial_path(path: str) -> str:
  """A sibling name to write to first; keeps the extension (OpenCV picks the container by it)."""
  head, tail = os.path.split(path)
  return os.path.join(head, f".{tail}.partial{os.path.splitext(tail)[1]}")


def _finish(partial: str, path: str, commit: bool) -> None:
  """Moves a finished output into place, or drops an unfinished one.

  Until then an existing file at ``path`` is untouched, so a run that fails
  never destroys the previous output.
  """
  if not os.path.exists(partial):
    return
  if not commit:
    os.remove(partial)
    return
  try:
    os.replace(partial, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise OutputError(f"{path}: cannot write ({e.strerror})") from None


class AnnotatedVideoWriter:
  """Writes annotated frames to a video (``.mp4``/``.mkv``: mp4v, ``.avi``: MJPG).

  The file is opened at the first frame, whose size it keeps; later frames of
  another size are scaled to it. Frames go to a hidden partial file that
  replaces ``path`` only when the run closes the writer successfully.
  """

  def __init__(self, path: str, fps: float):
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_CODECS:
      raise ConfigError(f"{path}: annotated video must end in {', '.join(VIDEO_CODECS)}")
    self.path = path
    self.fps = fps
    self._codec = VIDEO_CODECS[ext]
    self._writer = None
    self._started = False
    self._size: tuple[int, int] | None = None
    self.frames = 0

  def write(self, frame_bgr: np.ndarray) -> None:
    """Appends one frame; the first one opens the file and fixes the video's size."""
    import cv2

    if self._writer is None:
      self._size = (frame_bgr.shape[1], frame_bgr.shape[0])
      _make_parent(self.path)
      # Noted before the file exists: close() drops it even if Ctrl-C lands mid-call.
      self._started = True
      self._writer = cv2.VideoWriter(cv_path(_partial_path(self.path)),
                                     cv2.VideoWriter_fourcc(*self._codec), self.fps, self._size)
      if not self._writer.isOpened():
        raise OutputError(f"{self.path}: OpenCV cannot write a {self._codec} video here")
    if (frame_bgr.shape[1], frame_bgr.shape[0]) != self._size:
      frame_bgr = cv2.resize(frame_bgr, self._size, interpolation=cv2.INTER_AREA)
    self._writer.write(frame_bgr)
    self.frames += 1

  def close(self, commit: bool = True) -> None:
    """Finishes the video; ``commit=False`` (a failed run) discards it."""
    if self._writer is not None:
      self._writer.release()
      self._writer = None
    if self._started:
      self._started = False
      _finish(_partial_path(self.path), self.path, commit)


class AnnotatedImageWriter:
  """Writes annotated images into a folder under the input images' names, or to one file."""

  def __init__(self, path: str, *, single_file: bool = False):
    if os.path.splitext(path)[1].lower() in VIDEO_CODECS:
      raise ConfigError(f"{path}: for image input, --output is a folder of annotated images "
                        "(or an image file for one input image), not a video")
    self.path = path
    self.single_file = single_file
    self.frames = 0
    self._pending: list[tuple[str, str]] = []  # (partial file, final path)

  def write(self, frame_bgr: np.ndarray, name: str) -> None:
    """Writes one image under ``name`` (or to the one file); it is moved into place by close()."""
    import cv2

    path = self.path if self.single_file else os.path.join(self.path, name)
    _make_parent(path)
    partial = _partial_path(path)
    if path.lower().endswith(GREY_ONLY_EXTENSIONS) and frame_bgr.ndim == 3:
      frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)  # OpenCV writes PGM grey only.
    # Listed before it is written: close() drops it even if Ctrl-C lands while OpenCV
    # writes (where a large image's time goes), or the write fails.
    self._pending.append((partial, path))
    if not cv2.imwrite(cv_path(partial), frame_bgr):
      raise OutputError(f"{path}: OpenCV cannot write this image")
    self.frames += 1

  def close(self, commit: bool = True) -> None:
    """Moves every image into place, or, after a failed run, drops them all.

    Until then files already at the output names are untouched.
    """
    pending, self._pending = self._pending, []
    for partial, path in pending:
      _finish(partial, path, commit)


class ResultsCSV:
  """One CSV row per face: frame, time, image name, face, track, box, label, score, every
  probability."""

  def __init__(self, path: str, class_names: Sequence[str]):
    _make_parent(path)
    try:
      # A file name in another encoding than UTF-8 (Python holds its odd bytes as lone
      # surrogates) is written escaped, as Python's stderr does: the file stays UTF-8.
      self._file = open(_partial_path(path), "w", newline="", errors="backslashreplace")
    except OSError as e:
      raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    self.path = path
    self.class_names = tuple(class_names)
    self._writer = csv.writer(self._file)
    self._writer.writerow(csv_header(self.class_names))
    self.rows = 0

  def write(self, result: FrameResult) -> None:
    """Writes one row per face of ``result`` (none for a frame without faces)."""
    for i, face in enumerate(result.faces):
      t = "" if result.time_s is None else f"{result.time_s:.4f}"
      track = "" if face.track is None else face.track
      self._writer.writerow([result.index, t, result.name or "", i, track, *face.box, face.label,
                             f"{face.score:.6f}", *(f"{float(p):.6f}" for p in face.probs)])
      self.rows += 1

  def close(self, commit: bool = True) -> None:
    """Finishes the file; ``commit=False`` (a failed run) discards it."""
    self._file.close()
    _finish(_partial_path(self.path), self.path, commit)


def csv_header(class_names: Sequence[str]) -> list[str]:
  """The columns :class:`ResultsCSV` writes."""
  return ["frame", "time_s", "image", "face", "track", "x", "y", "w", "h", "label", "score",
          *(f"p_{name}" for name in class_names)]


def _make_parent(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OutputError(f"{parent}: cannot create this folder ({e.strerror})") from None


class ResultsJSON:
  """The run's record as JSON: its header, one entry per analysed frame, its summary.

  Frames go to the file as they come (a hidden partial file beside ``path``), so
  a long camera run keeps none of them in memory; :meth:`close` adds the summary
  and moves the file into place.
  """

  def __init__(self, path: str, header: dict):
    _make_parent(path)
    self.path = path
    self.frames = 0
    try:
      # File names in another encoding than UTF-8 are escaped by json.dumps (ASCII output).
      self._file = open(_partial_path(path), "w")
    except OSError as e:
      raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    try:
      self._write("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n"
                                   for k, v in header.items()) + ' "frames": [')
    except BaseException:
      self.close(commit=False)
      raise

  def _write(self, text: str) -> None:
    try:
      self._file.write(text)
    except OSError as e:
      raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

  def write(self, record: dict) -> None:
    """Adds one frame's entry (JSON-ready)."""
    self._write(("\n  " if self.frames == 0 else ",\n  ") + json.dumps(record))
    self.frames += 1

  def close(self, commit: bool = True, summary: dict | None = None) -> None:
    """Ends the file with ``summary``; ``commit=False`` (a failed run) discards it."""
    try:
      if commit:
        self._write(("\n ]" if self.frames else "]") + f',\n "summary": {json.dumps(summary)}\n}}\n')
      try:
        self._file.close()  # Flushes: a full disk shows here.
      except OSError as e:
        raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None
    except BaseException:
      commit = False
      raise
    finally:
      if not self._file.closed:
        with contextlib.suppress(OSError):
          self._file.close()
      _finish(_partial_path(self.path), self.path, commit)


def display_available() -> tuple[bool, str]:
  """Whether OpenCV can open a window here, and if not, why.

  The answer is kept for the process (per ``DISPLAY`` and ``WAYLAND_DISPLAY``):
  the probe opens and closes a window, which a user would see each time.
  """
  return _probe_display(os.environ.get("DISPLAY"), os.environ.get("WAYLAND_DISPLAY"))


@functools.cache
def _probe_display(display: str | None, wayland_display: str | None) -> tuple[bool, str]:
  import cv2

  if sys.platform.startswith("linux") and not (display or wayland_display):
    # Checked first: some GUI back-ends abort the process without a display.
    return False, "DISPLAY is not set"
  try:
    cv2.namedWindow("ferjax-probe", cv2.WINDOW_AUTOSIZE)
    cv2.destroyWindow("ferjax-probe")
  except cv2.error:
    return False, "this OpenCV build has no GUI support (opencv-python-headless)"
  return True, ""
