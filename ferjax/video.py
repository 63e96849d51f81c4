"""The realtime pipeline: frame sources, detect → crop → classify per frame, drawing and writers.

Sources are a camera (an index such as ``0``), a video file, an image file or a
folder of images. Each frame goes grey → Haar detection (:mod:`ferjax.faces`) →
48x48 crops → :class:`ferjax.inference.Predictor`, the same crop and
``preprocess`` as training. Results can be drawn (boxes, label, a probability
bar per emotion, FPS), shown in a window, written as an annotated video or
annotated images, and saved as CSV (one row per face) and JSON (one entry per
frame). Nothing is written to disk per frame unless an output is asked for.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ferjax.errors import ConfigError, FerjaxError
from ferjax.faces import Box, FaceDetector, to_gray

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pnm", ".tif", ".tiff",
                    ".webp")
# Both encoders are built into opencv-python-headless's FFmpeg (checked headless, OpenCV 4.14).
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
STAGES = ("read", "detect", "crop", "predict", "draw", "write", "show")


class SourceError(FerjaxError):
  """A frame source (camera, video, image or folder) cannot be opened or read."""


class OutputError(FerjaxError):
  """An output file (annotated video or images, CSV, JSON) cannot be written."""


@dataclasses.dataclass(frozen=True)
class FaceResult:
  """One face in one frame: where it is and what the model says.

  Attributes:
    box: the detected face in frame pixels (before the crop margin).
    probs: float32 ``(C,)`` class probabilities, summing to 1.
    label: the most probable class's name.
    label_index: its index.
    score: its probability.
  """

  box: Box
  probs: np.ndarray
  label: str
  label_index: int
  score: float

  def to_dict(self, class_names: Sequence[str]) -> dict:
    """JSON-ready: box ``[x, y, w, h]``, label, score and every class's probability."""
    return {"box": list(map(int, self.box)), "label": self.label, "score": round(self.score, 6),
            "probs": {name: round(float(p), 6) for name, p in zip(class_names, self.probs)}}


@dataclasses.dataclass
class FrameResult:
  """The faces of one frame of a source.

  Attributes:
    index: 0-based frame number within the source.
    time_s: seconds into the video (file: frame / rate; camera: since opening),
      None for images.
    name: the image's file name for image sources, else None.
    frame: the frame as read (BGR or grey uint8), not annotated.
    faces: results, largest face first; ``[]`` when no face was found.
    analyzed: False when ``every > 1`` and these results were reused from the
      last analysed frame.
  """

  index: int
  time_s: float | None
  name: str | None
  frame: np.ndarray
  faces: list[FaceResult]
  analyzed: bool = True


class PipelineStats:
  """Frame, face and per-stage time counts of a pipeline run, for FPS figures.

  Stages: ``read`` (decoding or waiting for the camera), ``detect`` (grey
  conversion and Haar cascade), ``crop``, ``predict`` (model, including the
  result's transfer to the host), ``draw``, ``write`` (annotated output and
  CSV) and ``show`` (window and key poll).
  """

  def __init__(self):
    self.frames = 0
    self.analyzed_frames = 0
    self.faces = 0
    self.seconds = {stage: 0.0 for stage in STAGES}
    self.calls = {stage: 0 for stage in STAGES}
    self._start: float | None = None
    self._stop: float | None = None

  def start(self) -> None:
    self._start = time.perf_counter()
    self._stop = None

  def stop(self) -> None:
    self._stop = time.perf_counter()

  def add(self, stage: str, seconds: float) -> None:
    self.seconds[stage] += seconds
    self.calls[stage] += 1

  @contextlib.contextmanager
  def time(self, stage: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(stage, time.perf_counter() - start)

  @property
  def wall_seconds(self) -> float:
    if self._start is None:
      return 0.0
    return (self._stop or time.perf_counter()) - self._start

  @property
  def fps(self) -> float:
    """Frames per second over the whole run (every stage included)."""
    wall = self.wall_seconds
    return self.frames / wall if wall > 0 else 0.0

  def summary(self) -> dict:
    """JSON-ready totals: frames, faces, FPS and mean milliseconds per stage call."""
    return {
        "frames": self.frames, "analyzed_frames": self.analyzed_frames, "faces": self.faces,
        "seconds": round(self.wall_seconds, 4), "fps": round(self.fps, 2),
        "ms_per_call": {s: round(1000 * self.seconds[s] / self.calls[s], 3)
                        for s in STAGES if self.calls[s]},
        "calls": {s: self.calls[s] for s in STAGES if self.calls[s]},
    }


def format_summary(summary: dict) -> str:
  """The end-of-run report: frames, faces, FPS and the per-stage breakdown."""
  lines = [f"frames processed {summary['frames']} (model ran on {summary['analyzed_frames']}), "
           f"faces found {summary['faces']}, {summary['fps']:.1f} FPS over "
           f"{summary['seconds']:.2f} s"]
  parts = [f"{s} {summary['ms_per_call'][s]:.2f} ms x{summary['calls'][s]}"
           for s in STAGES if s in summary["ms_per_call"]]
  if parts:
    lines.append("per call: " + ", ".join(parts))
  if summary.get("compile_seconds") is not None:
    sizes = summary.get("batch_sizes")
    which = f" for batch sizes {', '.join(map(str, sizes))}" if sizes else ""
    lines.append(f"(model compiled{which} before the first frame in "
                 f"{summary['compile_seconds']:.2f} s, not counted above)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@contextlib.contextmanager
def _quiet_opencv():
  """Silences OpenCV's own multi-line warnings while we test a source; we report it ourselves."""
  import cv2

  level = cv2.utils.logging.getLogLevel()
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
  try:
    yield
  finally:
    cv2.utils.logging.setLogLevel(level)


class FrameSource:
  """Frames from a camera, a video file, an image file or a folder of images.

  Iterating yields ``(frame, time_s, name)``: a uint8 BGR (or grey) frame, its
  time in seconds (None for images) and the image's file name (None for video).
  Open one with :func:`open_source`.

  Attributes:
    kind: ``camera``, ``video`` or ``images``.
    description: how the source is named in messages.
    fps: the source's frame rate when it has one, else None.
    skipped: files of an image folder that were not images (or unreadable).
  """

  def __init__(self, kind: str, description: str, *, capture=None, first=None,
               images: Sequence[str] = (), fps: float | None = None):
    self.kind = kind
    self.description = description
    self.fps = fps
    self.skipped: list[str] = []
    self._capture = capture
    self._first = first
    self._images = list(images)

  @property
  def is_images(self) -> bool:
    return self.kind == "images"

  @property
  def num_images(self) -> int:
    """How many image files an image source lists (0 for video and cameras)."""
    return len(self._images)

  def __iter__(self) -> Iterator[tuple[np.ndarray, float | None, str | None]]:
    if self.is_images:
      yield from self._iter_images()
    else:
      yield from self._iter_capture()

  def _iter_images(self):
    import cv2

    for path in self._images:
      frame = cv2.imread(path, cv2.IMREAD_UNCHANGED)
      if frame is not None and frame.dtype != np.uint8:  # 16-bit PNG/TIFF.
        frame = cv2.convertScaleAbs(frame, alpha=255.0 / max(1, int(frame.max())))
      if frame is None:
        if len(self._images) == 1:
          raise SourceError(f"{path}: cannot decode this image")
        log.warning("%s: cannot decode this image; skipped", path)
        self.skipped.append(path)
        continue
      yield frame, None, os.path.basename(path)

  def _iter_capture(self):
    start = time.perf_counter()
    index = 0
    frame = self._first
    self._first = None
    while True:
      if frame is None:
        ok, frame = self._capture.read()
        if not ok:
          if self.kind == "camera":
            log.warning("%s: no more frames (camera closed or unplugged)", self.description)
          return
      if self.kind == "camera":
        t = time.perf_counter() - start
      else:
        t = index / self.fps if self.fps else None
      yield frame, t, None
      frame = None
      index += 1

  def close(self) -> None:
    if self._capture is not None:
      self._capture.release()
      self._capture = None

  def __enter__(self) -> FrameSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_source(source: int | str | os.PathLike | FrameSource) -> FrameSource:
  """Opens a frame source and checks that it gives frames.

  Args:
    source: a camera index (``0`` or ``"0"``), a video file, an image file, a
      folder of images (read in natural name order; files that are not images
      are skipped with a warning), or a URL OpenCV understands.

  Returns:
    The opened source (already given back if ``source`` is one).

  Raises:
    SourceError: it does not exist, cannot be opened, or has no frame.
  """
  import cv2

  if isinstance(source, FrameSource):
    return source
  if isinstance(source, (int, np.integer)) or (isinstance(source, str)
                                                and source.strip().isdigit()):
    index = int(source)
    with _quiet_opencv():
      capture = cv2.VideoCapture(index)
      if not capture.isOpened():
        raise SourceError(f"camera {index}: cannot open it (no camera at this index, no "
                          "permission, or it is busy)")
      # Keep at most one frame queued, so a slow pipeline shows the newest frame.
      capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
      ok, first = capture.read()
    if not ok:
      capture.release()
      raise SourceError(f"camera {index}: opened but gives no frames")
    return FrameSource("camera", f"camera {index}", capture=capture, first=first,
                       fps=capture.get(cv2.CAP_PROP_FPS) or None)
  path = os.fspath(source)
  if "://" in path:  # A stream URL: OpenCV decides.
    return _open_video(path)
  if not os.path.exists(path):
    raise SourceError(f"{path}: no such file, folder or camera")
  if os.path.isdir(path):
    names = sorted(os.listdir(path), key=_natural_key)
    images, others = [], []
    for name in names:
      full = os.path.join(path, name)
      if not os.path.isfile(full):
        continue
      (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(full)
    for other in others:
      log.warning("%s: not an image file; skipped", other)
    if not images:
      raise SourceError(f"{path}: no image files in this folder (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    src = FrameSource("images", path, images=images)
    src.skipped.extend(others)
    return src
  if path.lower().endswith(IMAGE_EXTENSIONS):
    return FrameSource("images", path, images=[path])
  return _open_video(path)


def _open_video(path: str) -> FrameSource:
  import cv2

  with _quiet_opencv():
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
      raise SourceError(f"{path}: OpenCV cannot open this as a video or image")
    ok, first = capture.read()
  if not ok:
    capture.release()
    raise SourceError(f"{path}: opened, but no frame could be read")
  fps = capture.get(cv2.CAP_PROP_FPS)
  return FrameSource("video", path, capture=capture, first=first,
                     fps=fps if fps and fps > 0 else None)


# ----------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------


def analyze_frame(frame: np.ndarray | None, predictor, detector: FaceDetector,
                  stats: PipelineStats | None = None) -> list[FaceResult]:
  """Finds the faces in one frame and classifies each.

  Args:
    frame: uint8 BGR ``(H, W, 3)``, BGRA or grey frame. None or an empty array
      (cameras sometimes hand these out while starting) counts as a frame
      without faces.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector.
    stats: if given, the detect / crop / predict times are added to it.

  Returns:
    One result per face, largest first; ``[]`` for no face or an empty frame.

  Raises:
    ValueError: a frame that is not uint8 or has an unknown layout.
  """
  if frame is None or np.size(frame) == 0:
    return []
  t0 = time.perf_counter()
  gray = to_gray(frame)
  boxes = detector.detect(gray)
  t1 = time.perf_counter()
  if stats is not None:
    stats.add("detect", t1 - t0)
  if not boxes:
    return []
  crops_Nx48x48 = detector.crops(gray, boxes)
  t2 = time.perf_counter()
  probs_NxC = predictor.predict_faces(crops_Nx48x48)
  t3 = time.perf_counter()
  if stats is not None:
    stats.add("crop", t2 - t1)
    stats.add("predict", t3 - t2)
  names = predictor.class_names
  top = probs_NxC.argmax(axis=1)
  return [FaceResult(box, probs_NxC[i], names[top[i]], int(top[i]), float(probs_NxC[i, top[i]]))
          for i, box in enumerate(boxes)]


def analyze_video(source, predictor, detector: FaceDetector | None = None, *, every: int = 1,
                  max_frames: int | None = None,
                  stats: PipelineStats | None = None) -> Iterator[FrameResult]:
  """Runs :func:`analyze_frame` over every frame of a source.

  The source is opened at once (so a bad source raises here, not at the first
  frame) and closed when the iterator is exhausted or closed.

  Args:
    source: anything :func:`open_source` takes, or an opened :class:`FrameSource`.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector (default: ``FaceDetector(max_faces=predictor.max_faces)``).
    every: detect and classify every N-th frame of a video or camera and reuse
      those results in between (image sources are always analysed).
    max_frames: stop after this many frames.
    stats: if given, frame and face counts and stage times are added to it.

  Returns:
    An iterator of :class:`FrameResult`, one per frame.

  Raises:
    SourceError: the source cannot be opened.
  """
  if every < 1:
    raise ConfigError(f"every must be at least 1, got {every}")
  detector = detector or FaceDetector(max_faces=predictor.max_faces)
  owned = not isinstance(source, FrameSource)
  src = open_source(source)
  return _analyze(src, owned, predictor, detector, every, max_frames, stats)


def _analyze(src: FrameSource, owned: bool, predictor, detector, every, max_frames, stats):
  last: list[FaceResult] = []
  try:
    frames = iter(src)
    index = 0
    while max_frames is None or index < max_frames:
      t0 = time.perf_counter()
      item = next(frames, None)
      if stats is not None:
        stats.add("read", time.perf_counter() - t0)
      if item is None:
        return
      frame, time_s, name = item
      analyzed = src.is_images or index % every == 0
      if analyzed:
        last = analyze_frame(frame, predictor, detector, stats)
      if stats is not None:
        stats.frames += 1
        stats.analyzed_frames += int(analyzed)
        stats.faces += len(last) if analyzed else 0
      yield FrameResult(index, time_s, name, frame, last, analyzed)
      index += 1
  finally:
    if owned:
      src.close()


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
  """Draws boxes, top label and a probability bar per emotion next to each face.

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
    text = f"{face.label} {face.score:.2f}"
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


class AnnotatedVideoWriter:
  """Writes annotated frames to a video (``.mp4``/``.mkv``: mp4v, ``.avi``: MJPG).

  The file is opened at the first frame, whose size it keeps; later frames of
  another size are scaled to it.
  """

  def __init__(self, path: str, fps: float):
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_CODECS:
      raise ConfigError(f"{path}: annotated video must end in {', '.join(VIDEO_CODECS)}")
    self.path = path
    self.fps = fps
    self._codec = VIDEO_CODECS[ext]
    self._writer = None
    self._size: tuple[int, int] | None = None
    self.frames = 0

  def write(self, frame_bgr: np.ndarray) -> None:
    import cv2

    if self._writer is None:
      self._size = (frame_bgr.shape[1], frame_bgr.shape[0])
      _make_parent(self.path)
      self._writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*self._codec), self.fps,
                                     self._size)
      if not self._writer.isOpened():
        raise OutputError(f"{self.path}: OpenCV cannot write a {self._codec} video here")
    if (frame_bgr.shape[1], frame_bgr.shape[0]) != self._size:
      frame_bgr = cv2.resize(frame_bgr, self._size, interpolation=cv2.INTER_AREA)
    self._writer.write(frame_bgr)
    self.frames += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.release()
      self._writer = None


class AnnotatedImageWriter:
  """Writes annotated images into a folder under the input images' names, or to one file."""

  def __init__(self, path: str, *, single_file: bool = False):
    if os.path.splitext(path)[1].lower() in VIDEO_CODECS:
      raise ConfigError(f"{path}: for image input, --output is a folder of annotated images "
                        "(or an image file for one input image), not a video")
    self.path = path
    self.single_file = single_file
    self.frames = 0

  def write(self, frame_bgr: np.ndarray, name: str) -> None:
    import cv2

    if self.single_file:
      path = self.path
      _make_parent(path)
    else:
      os.makedirs(self.path, exist_ok=True)
      path = os.path.join(self.path, name)
    if not cv2.imwrite(path, frame_bgr):
      raise OutputError(f"{path}: OpenCV cannot write this image")
    self.frames += 1

  def close(self) -> None:
    pass


class ResultsCSV:
  """One CSV row per face: frame, time, image name, box, label, score, every probability."""

  def __init__(self, path: str, class_names: Sequence[str]):
    _make_parent(path)
    try:
      self._file = open(path, "w", newline="")
    except OSError as e:
      raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    self.path = path
    self.class_names = tuple(class_names)
    self._writer = csv.writer(self._file)
    self._writer.writerow(csv_header(self.class_names))
    self.rows = 0

  def write(self, result: FrameResult) -> None:
    for i, face in enumerate(result.faces):
      t = "" if result.time_s is None else f"{result.time_s:.4f}"
      self._writer.writerow([result.index, t, result.name or "", i, *face.box, face.label,
                             f"{face.score:.6f}", *(f"{float(p):.6f}" for p in face.probs)])
      self.rows += 1

  def close(self) -> None:
    self._file.close()


def csv_header(class_names: Sequence[str]) -> list[str]:
  """The columns :class:`ResultsCSV` writes."""
  return ["frame", "time_s", "image", "face", "x", "y", "w", "h", "label", "score",
          *(f"p_{name}" for name in class_names)]


def _make_parent(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OutputError(f"{parent}: cannot create this folder ({e.strerror})") from None


# ----------------------------------------------------------------------------
# The whole loop
# ----------------------------------------------------------------------------


def display_available() -> tuple[bool, str]:
  """Whether OpenCV can open a window here, and if not, why."""
  import cv2

  if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                               or os.environ.get("WAYLAND_DISPLAY")):
    # Checked first: some GUI back-ends abort the process without a display.
    return False, "DISPLAY is not set"
  try:
    cv2.namedWindow("ferjax-probe", cv2.WINDOW_AUTOSIZE)
    cv2.destroyWindow("ferjax-probe")
  except cv2.error:
    return False, "this OpenCV build has no GUI support (opencv-python-headless)"
  return True, ""


def run_pipeline(source, predictor, detector: FaceDetector | None = None, *,
                 output: str | None = None, csv_path: str | None = None,
                 json_path: str | None = None, display: bool = False, every: int = 1,
                 max_frames: int | None = None, draw_fps: bool = True,
                 window: str = "ferjax") -> dict:
  """Runs the realtime pipeline over a source until it ends (or ``q`` in the window).

  Args:
    source: anything :func:`open_source` takes, or an opened :class:`FrameSource`.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector (default: ``FaceDetector(max_faces=predictor.max_faces)``).
    output: annotated output: a video file (``.mp4``, ``.mkv``, ``.avi``) for
      camera or video input; a folder for image input (or an image file when
      the input is one image).
    csv_path: one row per face per analysed frame.
    json_path: one entry per analysed frame (written at the end) plus the summary.
    display: show a window; falls back to headless, with a warning, where
      there is no display.
    every: run detection and the model every N-th video frame, reusing the
      results in between.
    max_frames: stop after this many frames.
    draw_fps: write the running FPS on drawn frames.
    window: the window's title.

  Returns:
    :meth:`PipelineStats.summary` plus ``compile_seconds``, ``source``,
    ``displayed`` and the files written (``files``).

  Raises:
    SourceError: the source cannot be opened.
    OutputError, ConfigError: an output cannot be written.
  """
  import cv2

  src = open_source(source)
  writer = table = None
  try:
    if display:
      display, why = display_available()
      if not display:
        log.warning("no display (%s): running headless", why)
    if output:
      if src.is_images:
        # One input image may be written to an image file; otherwise output is a folder.
        single = src.num_images == 1 and output.lower().endswith(IMAGE_EXTENSIONS)
        writer = AnnotatedImageWriter(output, single_file=single)
      else:
        writer = AnnotatedVideoWriter(output, src.fps or 30.0)
    table = ResultsCSV(csv_path, predictor.class_names) if csv_path else None
    records = [] if json_path else None
    # After the outputs are checked (a bad name fails fast), before the first frame (so
    # compiling is not counted as frame time).
    compile_seconds = predictor.warmup()
    stats = PipelineStats()
    want_drawing = writer is not None or display
    smooth_period = None
    last_tick = None
    stats.start()
    frames = analyze_video(src, predictor, detector, every=every, max_frames=max_frames,
                           stats=stats)
    try:
      for result in frames:
        now = time.perf_counter()
        if last_tick is not None:
          # Exponential smoothing keeps the on-screen FPS readable.
          period = now - last_tick
          smooth_period = period if smooth_period is None else 0.9 * smooth_period + 0.1 * period
        last_tick = now
        if result.analyzed and (table is not None or records is not None):
          with stats.time("write"):
            if table is not None:
              table.write(result)
            if records is not None:
              records.append(_frame_record(result, predictor.class_names))
        if not want_drawing:
          continue
        with stats.time("draw"):
          fps = 1.0 / smooth_period if draw_fps and smooth_period else None
          annotated = draw_results(result.frame, result.faces, predictor.class_names, fps=fps)
        if writer is not None:
          with stats.time("write"):
            if src.is_images:
              writer.write(annotated, result.name)
            else:
              writer.write(annotated)
        if display:
          with stats.time("show"):
            cv2.imshow(window, annotated)
            # Images stay up until a key; video polls for 1 ms.
            key = cv2.waitKey(0 if src.is_images else 1) & 0xFF
          if key in (ord("q"), 27):
            log.info("quit from the keyboard")
            break
    except KeyboardInterrupt:
      # Ctrl-C is how a headless camera run ends: finish the outputs and report as usual.
      log.info("interrupted: stopping after %d frames", stats.frames)
    finally:
      stats.stop()
      frames.close()
  finally:
    if writer is not None:
      writer.close()
    if table is not None:
      table.close()
    if display:
      cv2.destroyAllWindows()
    src.close()
  summary = stats.summary()
  summary.update(compile_seconds=round(compile_seconds, 3),
                 batch_sizes=list(getattr(predictor, "batch_sizes", ())), source=src.description,
                 displayed=bool(display), skipped=list(src.skipped))
  files = [p for p in (output, csv_path) if p]
  if records is not None:
    _make_parent(json_path)
    try:
      with open(json_path, "w") as f:
        json.dump({"source": src.description, "class_names": list(predictor.class_names),
                   "checkpoint": getattr(predictor, "checkpoint", None), "every": every,
                   "summary": summary, "frames": records}, f, indent=1)
    except OSError as e:
      raise OutputError(f"{json_path}: cannot write ({e.strerror})") from None
    files.append(json_path)
  summary["files"] = files
  return summary


def _frame_record(result: FrameResult, class_names: Sequence[str]) -> dict:
  return {"frame": result.index, "time_s": None if result.time_s is None
          else round(result.time_s, 4), "image": result.name,
          "faces": [face.to_dict(class_names) for face in result.faces]}
