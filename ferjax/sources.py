"""Frame sources: a camera, a video file or stream, an image file or a folder of images.

:func:`open_source` opens one and checks that it gives frames; iterating the
:class:`FrameSource` it returns yields ``(frame, time_s, name)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ferjax.errors import FerjaxError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pnm", ".tif", ".tiff",
                    ".webp")


class SourceError(FerjaxError):
  """A frame source (camera, video, image or folder) cannot be opened or read."""


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
    frame_count: how many frames a video file's header announces, else None.
    skipped: files of an image folder that were not images (or unreadable).
  """

  def __init__(self, kind: str, description: str, *, capture=None, first=None,
               images: Sequence[str] = (), fps: float | None = None,
               frame_count: int | None = None):
    self.kind = kind
    self.description = description
    self.fps = fps
    self.frame_count = frame_count
    self.skipped: list[str] = []
    self._capture = capture
    self._first = first
    self._images = list(images)

  @property
  def is_images(self) -> bool:
    return self.kind == "images"

  @property
  def is_live(self) -> bool:
    """A camera or a network stream: it has no end of its own (Ctrl-C ends it)."""
    return self.kind == "camera" or "://" in self.description

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
    first, self._first = self._first, None  # A lone image, decoded by open_source.
    decoded = 0
    for path in self._images:
      frame = first if first is not None else read_image(path)
      first = None
      if frame is None:
        if len(self._images) == 1:
          raise SourceError(f"{path}: cannot decode this image")
        log.warning("%s: cannot decode this image; skipped", path)
        self.skipped.append(path)
        continue
      decoded += 1
      yield frame, None, os.path.basename(path)
    if not decoded:
      raise SourceError(f"{self.description}: none of its {len(self._images)} image files "
                        "could be decoded")

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
          elif self.frame_count and self.frame_count - index > max(2, self.frame_count // 20):
            # A cut-off download or a damaged file reads as a shorter video; the header's
            # count (an estimate for some containers, hence the slack) tells them apart.
            log.warning("%s: the video ended after %d of the %d frames it announces (cut off "
                        "or damaged?)", self.description, index, self.frame_count)
          return
      if self.kind == "camera":
        t = time.perf_counter() - start
      else:
        t = index / self.fps if self.fps else None
      yield frame, t, None
      frame = None
      index += 1

  def close(self) -> None:
    """Releases the camera or video (nothing for images); idempotent."""
    if self._capture is not None:
      self._capture.release()
      self._capture = None

  def __enter__(self) -> FrameSource:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def cv_path(path: str | os.PathLike) -> bytes:
  """A file name as OpenCV must be given it: the file system's bytes.

  OpenCV crashes the whole process (a segmentation fault, no exception) on a
  ``str`` that is not valid UTF-8, which is how Python spells a file name in
  another encoding (e.g. Latin-1 names from an old archive); the bytes Python
  read from the file system always work.
  """
  return os.fsencode(path)


def read_image(path: str) -> np.ndarray | None:
  """An image file as a uint8 BGR frame, upright; None when OpenCV cannot decode it."""
  import cv2

  # Colour (grey images come as BGR), any depth, turned upright as the EXIF orientation
  # says (IMREAD_UNCHANGED would ignore it: phone photos would lie on their side, where
  # the frontal face detector finds nothing).
  with _quiet_opencv():  # OpenCV logs its own error line for a file it cannot read.
    frame = cv2.imread(cv_path(path), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if frame is None:  # A grey float TIFF: OpenCV reads it only in its own colours.
      frame = cv2.imread(cv_path(path), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
  if frame is None:
    return None
  if frame.dtype != np.uint8:  # 16-bit PNG/TIFF, float TIFF.
    if frame.dtype.kind == "f":  # NaN or infinite pixels (HDR, scientific TIFFs) turn black.
      frame = np.nan_to_num(frame, nan=0.0, posinf=0.0, neginf=0.0)
    frame = cv2.convertScaleAbs(frame, alpha=255.0 / max(1.0, float(frame.max())))
  if frame.ndim == 2:
    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
  elif frame.shape[2] == 4:
    frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
  return frame


# A short real-face clip shipped with the package (Intel IoT DevKit sample
# videos, CC BY 4.0; see NOTICE): the camera-free demo, `--source=demo`.
DEMO_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                         "demo_face_clip.mkv")


def open_source(source: int | str | os.PathLike | FrameSource) -> FrameSource:
  """Opens a frame source and checks that it gives frames.

  Args:
    source: a camera index (``0`` or ``"0"``), a video file, an image file, a
      folder of images (read in natural name order; files that are not images
      are skipped with a warning), a URL OpenCV understands, or ``"demo"`` for
      the clip shipped with ferjax (:data:`DEMO_CLIP`).

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
  if not isinstance(source, (str, os.PathLike)):  # os.fspath's TypeError named no argument.
    hint = ("; for one frame already in memory use ferjax.video.analyze_frame"
            if isinstance(source, (np.ndarray, list)) else "")
    raise SourceError(f"source must be a camera index, a video or image file, a folder of "
                      f"images, a URL or 'demo', got {type(source).__name__}{hint}")
  path = os.fspath(source)
  if path == "demo":
    path = DEMO_CLIP
  if "://" in path:  # A stream URL: OpenCV decides.
    return _open_video(path)
  if not os.path.exists(path):
    raise SourceError(f"{path}: no such file, folder or camera")
  if os.path.isdir(path):
    names = sorted(os.listdir(path), key=_natural_key)
    images, others, folders = [], [], []
    for name in names:
      full = os.path.join(path, name)
      if os.path.isdir(full):
        folders.append(name)
      elif os.path.isfile(full):
        (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(full)
    for other in others:
      log.warning("%s: not an image file; skipped", other)
    # Only the folder's own files are read: say so, or photos sorted into subfolders
    # would vanish without a word.
    unsearched = (f"{len(folders)} subfolder{'s' if len(folders) != 1 else ''} "
                  f"({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}) not searched")
    if not images:
      raise SourceError(f"{path}: no image files in this folder (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)})" + (f"; {unsearched}" if folders else ""))
    if folders:
      log.warning("%s: %s", path, unsearched)
    src = FrameSource("images", path, images=images)
    src.skipped.extend(others)
    return src
  if path.lower().endswith(IMAGE_EXTENSIONS):
    first = read_image(path)  # Decoded now, so a broken image fails before the model loads.
    if first is None:
      raise SourceError(f"{path}: cannot decode this image")
    return FrameSource("images", path, images=[path], first=first)
  return _open_video(path)


# FFmpeg's tty demuxer plays a text file (.txt, .nfo, .asc, .ans, ...) as a video of its
# characters, whose codec OpenCV reports as FOURCC "ansi"; its text-art codecs bintext and
# xbin would read "bint" and "xbin" by the same rule (not seen here).
_TEXT_CODECS = ("ansi", "bint", "xbin")


def _open_video(path: str) -> FrameSource:
  import cv2

  with _quiet_opencv():
    capture = cv2.VideoCapture(cv_path(path))
    if not capture.isOpened():
      raise SourceError(f"{path}: OpenCV cannot open this as a video or image")
    fourcc = (int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little")
    if fourcc.decode("latin-1").strip("\0 ").lower() in _TEXT_CODECS:
      capture.release()
      raise SourceError(f"{path}: a text file, not a video or image (FFmpeg would play its "
                        "characters as ANSI art)")
    ok, first = capture.read()
  if not ok:
    capture.release()
    raise SourceError(f"{path}: opened, but no frame could be read")
  fps = capture.get(cv2.CAP_PROP_FPS)
  count = capture.get(cv2.CAP_PROP_FRAME_COUNT)  # 0 or negative when unknown (streams).
  return FrameSource("video", path, capture=capture, first=first,
                     fps=fps if fps and fps > 0 else None,
                     frame_count=int(count) if count and 0 < count < 2**31 else None)
