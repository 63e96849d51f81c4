"""Face detection (OpenCV's frontal-face Haar cascade) and cropping to 48x48 model input."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ferjax.errors import ConfigError, FerjaxError, is_whole
from ferjax.sources import cv_path

CASCADE_FILE = "haarcascade_frontalface_default.xml"
FACE_SIZE = 48  # FER2013's face size: what every model takes.
# The cascade's smallest window: a face smaller than this at detection scale is never found.
CASCADE_WINDOW = 24


class DetectorError(FerjaxError):
  """The face detector cannot be built (cascade file missing or unreadable)."""


class Box(NamedTuple):
  """A face rectangle in frame pixels: top-left corner, width and height."""

  x: int
  y: int
  w: int
  h: int

  @property
  def area(self) -> int:
    return self.w * self.h


def to_gray(frame: np.ndarray) -> np.ndarray:
  """Grey uint8 ``(H, W)`` from a BGR, BGRA or already grey OpenCV frame.

  Args:
    frame: uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` (BGR) or ``(H, W, 4)`` (BGRA).

  Returns:
    uint8 ``(H, W)``.

  Raises:
    ValueError: another dtype or layout.
  """
  import cv2

  if frame is None:
    raise ValueError("no frame (None): cv2.imread and VideoCapture.read give None for an image "
                     "or frame they could not read")
  frame = np.asarray(frame)
  if frame.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 (as OpenCV reads them), got {frame.dtype}")
  if frame.ndim == 2:
    return frame
  if frame.ndim == 3 and frame.shape[2] == 1:
    return frame[..., 0]
  if frame.ndim == 3 and frame.shape[2] == 3:
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
  if frame.ndim == 3 and frame.shape[2] == 4:
    return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
  raise ValueError(f"expected a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) frame, got shape "
                   f"{frame.shape}")


def iou(a: Box, b: Box) -> float:
  """Intersection over union of two boxes (0 when they do not overlap)."""
  w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
  h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
  if w <= 0 or h <= 0:
    return 0.0
  inter = w * h
  return inter / (a.area + b.area - inter)


def should_track(previous: Sequence[Box], tracked: int, redetect_every: int) -> bool:
  """The tracking schedule: True when the next frame should only look near ``previous``.

  Args:
    previous: the faces of the last analysed frame (none: search in full).
    tracked: frames tracked since the last full-frame search.
    redetect_every: a full-frame search on every N-th frame (1: always).
  """
  return bool(previous) and tracked < redetect_every - 1


def expand_box(box: Box, margin: float, frame_hw: tuple[int, int]) -> Box:
  """Grows ``box`` by ``margin`` of its size on every side, clipped to the frame.

  Args:
    box: the face rectangle.
    margin: fraction of the width (height) added left and right (top and bottom).
    frame_hw: the frame's ``(height, width)``.

  Returns:
    The grown box; at least 1x1 and inside the frame.
  """
  height, width = frame_hw
  dx, dy = int(round(box.w * margin)), int(round(box.h * margin))
  # A box from an earlier, larger frame may lie beyond this one: clip its corner too.
  x0 = min(max(0, box.x - dx), width - 1)
  y0 = min(max(0, box.y - dy), height - 1)
  x1, y1 = min(width, box.x + box.w + dx), min(height, box.y + box.h + dy)
  return Box(x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def crop_face(gray: np.ndarray, box: Box, margin: float = 0.0, size: int = FACE_SIZE
              ) -> np.ndarray:
  """Cuts a face out of a grey frame and scales it to the model's input size.

  Together with :func:`ferjax.preprocess.preprocess` this is the one path from
  a camera frame to model input. Near the frame's edge the grown box is clipped,
  so the crop may be slightly non-square before resizing.

  Args:
    gray: uint8 ``(H, W)`` grey frame.
    box: the face rectangle in ``gray``'s pixels.
    margin: fraction of the box size added on every side before cropping.
    size: output side length (48 for every ferjax model).

  Returns:
    uint8 ``(size, size)``.
  """
  import cv2

  x, y, w, h = expand_box(box, margin, gray.shape[:2])
  # INTER_AREA averages the source pixels: the right filter for shrinking (the usual case).
  return cv2.resize(gray[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_AREA)


class FaceDetector:
  """Finds frontal faces with OpenCV's Haar cascade, on a downscaled grey frame.

  Detecting at reduced resolution is the detector's main speed knob: the
  cascade's cost grows with the pixel count, and faces big enough to classify
  are still found. Boxes are mapped back to full-frame pixels.

  Attributes:
    scale_factor: step between the cascade's search scales (``detectMultiScale``).
    min_neighbors: overlapping hits a face needs; higher means fewer false faces.
    min_size: smallest face side, in full-frame pixels. The effective minimum is
      also at least ``24 * downscale`` (the cascade's window at detection scale).
    margin: fraction of the box size added on every side when cropping, so the
      crop shows a little forehead and chin as FER2013's faces do.
    max_faces: at most this many faces per frame (the largest are kept).
    downscale: detect on the frame shrunk by this factor (1 = full size).
    track_margin: :meth:`detect_near` searches a previous face's box grown by
      this fraction of its size on every side.
    track_scale: :meth:`detect_near` accepts faces between ``1/track_scale``
      and ``track_scale`` times the previous face's size.
  """

  def __init__(self, *, scale_factor: float = 1.2, min_neighbors: int = 5, min_size: int = 48,
               margin: float = 0.1, max_faces: int = 8, downscale: float = 2.0,
               track_margin: float = 0.5, track_scale: float = 1.5,
               cascade_path: str | None = None):
    import cv2

    if scale_factor <= 1.0:
      raise ConfigError(f"scale_factor must be above 1, got {scale_factor}")
    if downscale < 1.0:
      raise ConfigError(f"downscale must be at least 1, got {downscale}")
    # Counts are checked as whole numbers here: OpenCV and the slice to max_faces would
    # otherwise fail on the first detect(), and a negative min_neighbors turns grouping off.
    if not is_whole(max_faces, 1):
      raise ConfigError(f"max_faces must be a whole number of at least 1, got {max_faces!r}")
    if not is_whole(min_neighbors, 0):
      raise ConfigError(f"min_neighbors must be a whole number of at least 0, got "
                        f"{min_neighbors!r}")
    # A string failed at the first detect() as a TypeError; a negative size meant no minimum.
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Real) or not min_size >= 0:
      raise ConfigError(f"min_size must be a number of pixels, at least 0, got {min_size!r}")
    if margin < 0:
      raise ConfigError(f"margin must not be negative, got {margin}")
    if track_margin < 0:
      raise ConfigError(f"track_margin must not be negative, got {track_margin}")
    if track_scale < 1.0:
      raise ConfigError(f"track_scale must be at least 1, got {track_scale}")
    if cascade_path is None:
      cascade_path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
    if not os.path.isfile(cascade_path):
      raise DetectorError(f"{cascade_path}: Haar cascade file not found (opencv-python-headless "
                          "4.x ships it under cv2.data.haarcascades)")
    try:
      self.cascade = cv2.CascadeClassifier(cv_path(cascade_path))
      loaded = not self.cascade.empty()
    except (cv2.error, SystemError):  # A malformed file fails inside OpenCV's constructor.
      loaded = False
    if not loaded:
      raise DetectorError(f"{cascade_path}: OpenCV could not load this Haar cascade")
    self.cascade_path = cascade_path
    self.scale_factor = scale_factor
    self.min_neighbors = min_neighbors
    self.min_size = min_size
    self.margin = margin
    self.max_faces = max_faces
    self.downscale = downscale
    self.track_margin = track_margin
    self.track_scale = track_scale

  def _search(self, gray: np.ndarray, min_side: float, max_side: float | None = None
              ) -> list[Box]:
    """The cascade over ``gray`` shrunk by ``downscale``, for faces ``min_side`` to
    ``max_side`` full-size pixels across; boxes in ``gray``'s pixels, unsorted."""
    import cv2

    small = gray
    if self.downscale > 1.0:
      h, w = gray.shape[:2]
      size = (max(1, int(round(w / self.downscale))), max(1, int(round(h / self.downscale))))
      small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    low = max(1, int(round(min_side / self.downscale)))
    high = 0 if max_side is None else max(low, int(round(max_side / self.downscale)))
    if min(small.shape[:2]) < max(low, CASCADE_WINDOW):
      return []  # Smaller than the faces searched for: nothing to find.
    found = self.cascade.detectMultiScale(small, scaleFactor=self.scale_factor,
                                          minNeighbors=self.min_neighbors, minSize=(low, low),
                                          maxSize=(high, high))
    sx, sy = gray.shape[1] / small.shape[1], gray.shape[0] / small.shape[0]
    return [Box(int(round(x * sx)), int(round(y * sy)), int(round(w * sx)), int(round(h * sy)))
            for x, y, w, h in np.asarray(found).reshape(-1, 4).tolist()]

  def detect(self, gray: np.ndarray) -> list[Box]:
    """Faces in a grey frame, largest first, at most ``max_faces``.

    Args:
      gray: uint8 ``(H, W)`` frame; a BGR or BGRA one goes through :func:`to_gray`.

    Returns:
      Boxes in ``gray``'s pixels; ``[]`` when there is no face.

    Raises:
      ValueError: a frame that is not uint8 or has an unknown layout (or None).
    """
    # Checked before OpenCV, whose assertion on a float frame names neither the argument
    # nor the fix (a no-op for the grey frames analyze_frame passes).
    gray = to_gray(gray)
    boxes = self._search(gray, self.min_size)
    boxes.sort(key=lambda b: b.area, reverse=True)
    return boxes[:self.max_faces]

  def detect_near(self, gray: np.ndarray,
                  previous: Sequence[Box | tuple[int, int, int, int]]) -> list[Box]:
    """Faces found again near ``previous`` boxes: the cheap step of tracking.

    Each previous face is searched for only in a window around it (the box
    grown by ``track_margin`` on every side) and only at sizes within
    ``track_scale`` of its own, at the same downscale and cascade settings as
    :meth:`detect`. That costs a fraction of a full-frame search. A face not
    found again is dropped; new faces appear only at the next full
    :meth:`detect`, which the caller schedules.

    Args:
      gray: uint8 ``(H, W)`` frame; a BGR or BGRA one goes through :func:`to_gray`.
      previous: the faces of an earlier frame, in ``gray``'s pixels: ``Box``es,
        ``(x, y, w, h)`` tuples, or the rows of OpenCV's ``detectMultiScale``.

    Returns:
      Boxes in ``gray``'s pixels, largest first, at most ``max_faces``, no two
      overlapping by more than half (intersection over union).

    Raises:
      ValueError: a frame that is not uint8 or has an unknown layout (or None).
    """
    gray = to_gray(gray)
    found: list[Box] = []
    for box in previous:
      box = Box(*(int(v) for v in box))  # Plain (x, y, w, h) tuples and array rows too.
      region = expand_box(box, self.track_margin, gray.shape[:2])
      side = min(box.w, box.h)
      # Never below detect()'s smallest face, so tracking keeps no face a full search would
      # not have found at its size.
      hits = self._search(gray[region.y:region.y + region.h, region.x:region.x + region.w],
                          max(self.min_size, side / self.track_scale), side * self.track_scale)
      if not hits:
        continue
      cx, cy = box.x - region.x + box.w / 2, box.y - region.y + box.h / 2
      # The hit nearest the old centre is the same face.
      x, y, w, h = min(hits, key=lambda b: (b.x + b.w / 2 - cx) ** 2 + (b.y + b.h / 2 - cy) ** 2)
      found.append(Box(region.x + x, region.y + y, w, h))
    found.sort(key=lambda b: b.area, reverse=True)
    kept: list[Box] = []
    for box in found:  # Two tracks that converged on one face keep the larger box.
      if all(iou(box, other) <= 0.5 for other in kept):
        kept.append(box)
    return kept[:self.max_faces]

  def crops(self, gray: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """The model-input crops of ``boxes``: uint8 ``(len(boxes), 48, 48)``.

    ``gray`` is the frame the boxes were found in: grey, or BGR or BGRA
    (converted with :func:`to_gray`, as the model takes grey faces).
    """
    gray = to_gray(gray)
    out_Nx48x48 = np.empty((len(boxes), FACE_SIZE, FACE_SIZE), np.uint8)
    for i, box in enumerate(boxes):
      out_Nx48x48[i] = crop_face(gray, box, self.margin)
    return out_Nx48x48

  def __repr__(self) -> str:
    return (f"FaceDetector(scale_factor={self.scale_factor}, min_neighbors={self.min_neighbors}, "
            f"min_size={self.min_size}, margin={self.margin}, max_faces={self.max_faces}, "
            f"downscale={self.downscale}, track_margin={self.track_margin}, "
            f"track_scale={self.track_scale})")
