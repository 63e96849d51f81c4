"""The realtime pipeline: detect → crop → classify per frame of a source, with timings.

Sources (:mod:`ferjax.sources`) are a camera (an index such as ``0``), a video
file, an image file or a folder of images. Each frame goes grey → Haar
detection (:mod:`ferjax.faces`; a full-frame search every few frames, tracking
near the known faces in between) → 48x48 crops →
:class:`ferjax.inference.Predictor`, the same crop and ``preprocess`` as
training. Results can be drawn (boxes, label, a probability bar per emotion,
FPS), shown in a window, written as an annotated video or annotated images, and
saved as CSV (one row per face) and JSON (one entry per frame); drawing and
writers live in :mod:`ferjax.annotate`. Nothing is written to disk per frame
unless an output is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ferjax.annotate import (VIDEO_CODECS, AnnotatedImageWriter, AnnotatedVideoWriter,
                             OutputError, ResultsCSV, ResultsJSON, display_available,
                             draw_results)
from ferjax.errors import ConfigError, is_whole, nearest_existing
from ferjax.faces import Box, FaceDetector, iou, should_track, to_gray
from ferjax.sources import DEMO_CLIP, IMAGE_EXTENSIONS, FrameSource, open_source

log = logging.getLogger(__name__)

STAGES = ("read", "detect", "crop", "predict", "draw", "write", "show")
# Full-frame face searches on every 5th analysed frame, tracking in between: a new face
# shows up within 4 frames (0.13 s at 30 FPS), and the Haar search, the pipeline's
# largest cost, runs about a quarter as often (BUILD_NOTES.md, "Realtime pipeline").
REDETECT_EVERY = 5
# Faces of two consecutive analysed frames are paired as one face (one track, and --smooth)
# when their boxes overlap at least this much (intersection over union). A face's box moves
# little from one frame to the next; a lower bound would pair a face with a neighbour that
# took its place.
SAME_FACE_MIN_IOU = 0.3
# A face not found in an analysed frame (the detector missed it, or it was hidden) stays
# pairable, where it was last seen, for this many analysed frames: found again there, it
# keeps its track number and its smoothing. Haar misses a face now and then for a frame.
TRACK_GRACE_FRAMES = 5


@dataclasses.dataclass(frozen=True)
class FaceResult:
  """One face in one frame: where it is and what the model says.

  Attributes:
    box: the detected face in frame pixels (before the crop margin).
    probs: float32 ``(C,)`` class probabilities, summing to 1.
    label: the most probable class's name.
    label_index: its index.
    score: its probability.
    track: in a video or camera, the face's number, kept from frame to frame
      while it is found in every analysed frame (:func:`pair_faces`); the
      first face gets 0. None for images and for :func:`analyze_frame` alone.
  """

  box: Box
  probs: np.ndarray
  label: str
  label_index: int
  score: float
  track: int | None = None

  def to_dict(self, class_names: Sequence[str]) -> dict:
    """JSON-ready: box ``[x, y, w, h]``, track, label, score and every class's probability."""
    return {"box": list(map(int, self.box)), "track": self.track, "label": self.label,
            "score": round(self.score, 6),
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
    self.full_detections = 0
    self.seconds = {stage: 0.0 for stage in STAGES}
    self.calls = {stage: 0 for stage in STAGES}
    self._start: float | None = None
    self._stop: float | None = None

  def start(self) -> None:
    """Starts (or restarts) the wall clock that :attr:`fps` divides by."""
    self._start = time.perf_counter()
    self._stop = None

  def stop(self) -> None:
    """Stops the wall clock."""
    self._stop = time.perf_counter()

  def add(self, stage: str, seconds: float) -> None:
    """Counts one call of ``stage`` that took ``seconds``."""
    self.seconds[stage] += seconds
    self.calls[stage] += 1

  @contextlib.contextmanager
  def time(self, stage: str):
    """A context manager that adds the time its body takes to ``stage``."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(stage, time.perf_counter() - start)

  @property
  def wall_seconds(self) -> float:
    """Seconds from :meth:`start` to :meth:`stop` (or to now while running)."""
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
        "full_detections": self.full_detections,
        "seconds": round(self.wall_seconds, 4), "fps": round(self.fps, 2),
        "ms_per_call": {s: round(1000 * self.seconds[s] / self.calls[s], 3)
                        for s in STAGES if self.calls[s]},
        "calls": {s: self.calls[s] for s in STAGES if self.calls[s]},
    }


class TrackTally:
  """What each face of a video showed: its frames, its labels and mean probabilities.

  Feed it every analysed :class:`FrameResult` (:meth:`add`); faces without a
  track number (images) are left out. Only counts and sums are kept, so a
  long camera run costs a few numbers per face.
  """

  def __init__(self, class_names: Sequence[str]):
    self.class_names = tuple(class_names)
    self._tracks: dict[int, dict] = {}

  def add(self, result: FrameResult) -> None:
    """Counts the faces of one analysed frame."""
    for face in result.faces:
      if face.track is None:
        continue
      t = self._tracks.setdefault(face.track, {
          "frames": 0, "first_frame": result.index, "first_time_s": result.time_s,
          "labels": np.zeros(len(self.class_names), np.int64),
          "probs": np.zeros(len(self.class_names), np.float64)})
      t["frames"] += 1
      t["last_frame"], t["last_time_s"] = result.index, result.time_s
      t["labels"][face.label_index] += 1
      t["probs"] += face.probs

  def summary(self) -> list[dict]:
    """JSON-ready, one entry per track in order: frames, first and last frame and
    time, the most frequent label, every label's count and the mean probabilities."""
    rounded = lambda seconds: None if seconds is None else round(seconds, 4)
    out = []
    for track, t in sorted(self._tracks.items()):
      out.append({
          "track": track, "frames": t["frames"], "first_frame": t["first_frame"],
          "last_frame": t["last_frame"], "first_time_s": rounded(t["first_time_s"]),
          "last_time_s": rounded(t["last_time_s"]),
          "label": self.class_names[int(t["labels"].argmax())],
          "labels": {n: int(c) for n, c in zip(self.class_names, t["labels"]) if c},
          "mean_probs": {n: round(float(p) / t["frames"], 6)
                         for n, p in zip(self.class_names, t["probs"])}})
    return out


# The end-of-run report names the faces seen longest; the JSON summary has them all.
_REPORTED_TRACKS = 10


def format_summary(summary: dict) -> str:
  """The end-of-run report: frames, faces, FPS and the per-stage breakdown."""
  searches = summary.get("full_detections")
  if searches is None:
    searched = ""
  elif searches >= summary["analyzed_frames"]:  # Images, or --redetect_every=1: none tracked.
    searched = " (every frame searched in full)"
  else:
    searched = (f" ({searches} frame{'s' if searches != 1 else ''} searched in full, the rest "
                "tracked)")
  lines = [f"frames processed {summary['frames']} (model ran on {summary['analyzed_frames']}), "
           f"faces found {summary['faces']}{searched}, {summary['fps']:.1f} FPS over "
           f"{summary['seconds']:.2f} s"]
  parts = [f"{s} {summary['ms_per_call'][s]:.2f} ms x{summary['calls'][s]}"
           for s in STAGES if s in summary["ms_per_call"]]
  if parts:
    lines.append("per call: " + ", ".join(parts))
  tracks = summary.get("tracks") or []
  for t in sorted(tracks, key=lambda t: (-t["frames"], t["track"]))[:_REPORTED_TRACKS]:
    if t["first_frame"] == t["last_frame"]:
      where = f"frame {t['first_frame']}" + (
          "" if t["first_time_s"] is None else f", {t['first_time_s']:.2f} s")
    else:
      where = f"frames {t['first_frame']}-{t['last_frame']}" + (
          "" if t["first_time_s"] is None
          else f", {t['first_time_s']:.2f}-{t['last_time_s']:.2f} s")
    lines.append(f"face #{t['track']}: {t['frames']} frame{'s' if t['frames'] != 1 else ''} "
                 f"({where}), mostly {t['label']} ({t['labels'][t['label']]} of {t['frames']})")
  if len(tracks) > _REPORTED_TRACKS:
    lines.append(f"... and {len(tracks) - _REPORTED_TRACKS} more faces (seen for fewer "
                 "frames) in the JSON summary")
  if summary.get("compile_seconds") is not None:
    sizes = summary.get("batch_sizes")
    which = f" for batch sizes {', '.join(map(str, sizes))}" if sizes else ""
    lines.append(f"(model compiled{which} before the first frame in "
                 f"{summary['compile_seconds']:.2f} s, not counted above)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------


def analyze_frame(frame: np.ndarray | None, predictor, detector: FaceDetector,
                  stats: PipelineStats | None = None,
                  near: Sequence[Box] | None = None) -> list[FaceResult]:
  """Finds the faces in one frame and classifies each.

  Args:
    frame: uint8 BGR ``(H, W, 3)``, BGRA or grey frame. None or an empty array
      (cameras sometimes hand these out while starting) counts as a frame
      without faces.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector.
    stats: if given, the detect / crop / predict times are added to it.
    near: track these faces of an earlier frame (:meth:`FaceDetector.detect_near`,
      which finds no new face) instead of searching the whole frame.

  Returns:
    One result per face, largest first; ``[]`` for no face or an empty frame.

  Raises:
    ValueError: a frame that is not uint8 or has an unknown layout.
    ConfigError: ``predictor`` or ``detector`` is not one (e.g. a checkpoint
      path, or the two swapped).
  """
  # Before the frame: a faceless frame would otherwise return [] and hide the mistake.
  check_predictor_and_detector(predictor, detector)
  if _is_empty(frame):
    return []
  t0 = time.perf_counter()
  gray = to_gray(frame)
  if near is None:
    boxes = detector.detect(gray)
  else:
    boxes = detector.detect_near(gray, near)
  t1 = time.perf_counter()
  if stats is not None:
    stats.add("detect", t1 - t0)
    stats.full_detections += int(near is None)
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


def pair_faces(boxes: Sequence[Box], previous: Sequence[Box]) -> dict[int, int]:
  """Which face of the last frame each face is: ``{index in boxes: index in previous}``.

  Pairs are made by how much the boxes overlap (intersection over union), the
  most overlapping pair first, each face in at most one pair, and no pair below
  :data:`SAME_FACE_MIN_IOU`; a face left out is new (or was not found in the
  last frame).
  """
  scored = sorted(((iou(box, past), i, j) for i, box in enumerate(boxes)
                   for j, past in enumerate(previous)), reverse=True)
  pairs: dict[int, int] = {}
  for overlap, i, j in scored:
    if overlap < SAME_FACE_MIN_IOU:
      break
    if i not in pairs and j not in pairs.values():
      pairs[i] = j
  return pairs


def smooth_faces(faces: Sequence[FaceResult], previous: Sequence[FaceResult], keep: float,
                 class_names: Sequence[str],
                 pairs: dict[int, int] | None = None) -> list[FaceResult]:
  """Averages each face's probabilities with those of the same face in the last frame.

  A face paired with one of ``previous`` (:func:`pair_faces`) gets
  probabilities ``keep * previous + (1 - keep) * its own``, and its label and
  score follow them. Over frames this is an exponential moving average per
  face, which steadies labels that would flicker between two close classes. A
  face with no pair keeps its own.

  Args:
    faces: this frame's results, as :func:`analyze_frame` returns them.
    previous: the last analysed frame's results (already smoothed).
    keep: the weight of the past, in ``[0, 1)``; 0 returns ``faces`` as they are.
    class_names: the names the labels come from.
    pairs: :func:`pair_faces` of the two frames' boxes, if already made.

  Returns:
    One result per face of ``faces``, in its order, with the same boxes and tracks.
  """
  out = list(faces)
  if not keep or not previous:
    return out
  if pairs is None:
    pairs = pair_faces([f.box for f in faces], [p.box for p in previous])
  for i, j in pairs.items():
    face = faces[i]
    probs = (keep * previous[j].probs + (1.0 - keep) * face.probs).astype(face.probs.dtype)
    top = int(probs.argmax())
    out[i] = dataclasses.replace(face, probs=probs, label=class_names[top], label_index=top,
                                 score=float(probs[top]))
  return out


def analyze_video(source, predictor, detector: FaceDetector | None = None, *, every: int = 1,
                  redetect_every: int = REDETECT_EVERY, max_frames: int | None = None,
                  smooth: float = 0.0, track_grace: int = TRACK_GRACE_FRAMES,
                  stats: PipelineStats | None = None) -> Iterator[FrameResult]:
  """Runs :func:`analyze_frame` over every frame of a source.

  The source is opened at once (so a bad source raises here, not at the first
  frame) and closed when the iterator is exhausted or closed.

  Args:
    source: anything :func:`ferjax.sources.open_source` takes, or an opened
      :class:`ferjax.sources.FrameSource`.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector (default: ``FaceDetector(max_faces=predictor.max_faces)``).
    every: detect and classify every N-th frame of a video or camera and reuse
      those results in between (image sources are always analysed).
    redetect_every: search the whole frame on every N-th analysed frame of a
      video or camera, and track the faces already found (search only near
      them) on the frames between; a frame with no face tracked, or of another
      size than the last, is always searched in full. 1 searches every frame;
      images are always searched.
    max_frames: stop after this many frames.
    smooth: in ``[0, 1)``: on a video or camera, each face's probabilities
      are averaged with the same face's (the same ``track``) in the last
      analysed frame it was found in, this much weight on the past
      (:func:`smooth_faces`); the labels follow. 0 (the default) takes each
      frame alone; images are never smoothed.
    track_grace: a face missing from an analysed frame stays pairable, at its
      last box, for this many analysed frames (:data:`TRACK_GRACE_FRAMES`); 0
      forgets it at once.
    stats: if given, frame and face counts and stage times are added to it.

  Returns:
    An iterator of :class:`FrameResult`, one per frame. In a video or camera
    each face carries its ``track`` number: the same face keeps it from one
    analysed frame to the next (paired by box overlap, :func:`pair_faces`),
    also across up to ``track_grace`` analysed frames without it (paired with
    its last box); any other face gets a new one.

  Raises:
    ferjax.sources.SourceError: the source cannot be opened.
    ConfigError: ``every`` or ``redetect_every`` is not a whole number of at
      least 1, ``max_frames`` is not a whole number of at least 1,
      ``track_grace`` not one of at least 0, ``smooth`` is not in ``[0, 1)``,
      or ``predictor`` or ``detector`` is not one.
  """
  # Whole numbers: every=1.5 would analyse every third frame (index % 1.5 == 0) silently.
  if not is_whole(every, 1):
    raise ConfigError(f"every must be a whole number of at least 1, got {every!r}")
  if not is_whole(redetect_every, 1):
    raise ConfigError(f"redetect_every must be a whole number of at least 1, got "
                      f"{redetect_every!r}")
  # At least 1: -1 (read elsewhere as "no limit") gave no frames, without a word.
  if max_frames is not None and not is_whole(max_frames, 1):
    raise ConfigError(f"max_frames must be a whole number of at least 1 (None: no limit), got "
                      f"{max_frames!r}")
  check_track_grace(track_grace)
  check_smooth(smooth)
  check_predictor_and_detector(predictor, detector)
  detector = detector or FaceDetector(max_faces=predictor.max_faces)
  owned = not isinstance(source, FrameSource)
  src = open_source(source)
  if hasattr(predictor, "warmup"):
    try:
      predictor.warmup()  # Every batch size compiled now, not on the first frames with faces.
    except BaseException:
      if owned:
        src.close()
      raise
  return _analyze(src, owned, predictor, detector, every, redetect_every, max_frames, smooth,
                  track_grace, stats)


def _follow(faces: list[FaceResult], previous: list[FaceResult], missing: list[tuple],
            smooth: float, grace: int, class_names: Sequence[str],
            new_tracks: Iterator[int]) -> tuple[list[FaceResult], list[tuple]]:
  """A video frame's faces numbered after earlier ones, then smoothed with them.

  ``previous`` are the last analysed frame's faces, ``missing`` the faces lost
  before it, as ``(face, analysed frames since it was found)``. Each face is paired
  (:func:`pair_faces`) with one of both; a new face takes the next number of
  ``new_tracks``. Returns the faces and the new ``missing``: the unpaired faces
  of both, each one frame older, for at most ``grace`` frames.
  """
  earlier = [(face, 0) for face in previous] + missing
  known = [face for face, _ in earlier]
  pairs = pair_faces([f.box for f in faces], [f.box for f in known])
  numbered = [dataclasses.replace(face, track=known[pairs[i]].track if i in pairs
                                  else next(new_tracks)) for i, face in enumerate(faces)]
  found = set(pairs.values())
  missing = [(face, age + 1) for j, (face, age) in enumerate(earlier)
             if j not in found and age < grace]
  return smooth_faces(numbered, known, smooth, class_names, pairs), missing


def check_predictor_and_detector(predictor, detector) -> None:
  """Refuses a ``predictor`` that is no Predictor and a ``detector`` that is no detector.

  A checkpoint path given as the predictor, or the detector's class for an
  instance, failed later as an AttributeError or a TypeError naming neither.
  """
  if not (hasattr(predictor, "predict_faces") and hasattr(predictor, "class_names")):
    hint = ("; load a checkpoint with Predictor(path)"
            if isinstance(predictor, (str, os.PathLike)) else "")
    raise ConfigError(f"predictor must be a ferjax.inference.Predictor, e.g. Predictor() for "
                      f"the shipped weights, got {type(predictor).__name__}{hint}")
  if detector is not None and (isinstance(detector, type) or not hasattr(detector, "detect")):
    raise ConfigError(f"detector must be a ferjax.faces.FaceDetector, e.g. FaceDetector(), or "
                      f"None for the default, got {detector!r}")


def check_track_grace(track_grace) -> None:
  """Refuses a ``track_grace`` that is not a whole number of at least 0."""
  if not is_whole(track_grace, 0):
    raise ConfigError(f"track_grace must be a whole number of at least 0, got {track_grace!r}")


def check_smooth(smooth) -> None:
  """Refuses a ``smooth`` weight outside ``[0, 1)`` (1 would never take a new frame)."""
  if isinstance(smooth, bool) or not isinstance(smooth, (int, float, np.floating)) \
      or not 0 <= smooth < 1:
    raise ConfigError(f"smooth must be at least 0 and below 1, got {smooth!r}")


def _analyze(src: FrameSource, owned: bool, predictor, detector, every, redetect_every,
             max_frames, smooth, track_grace, stats):
  last: list[FaceResult] = []
  missing: list[tuple[FaceResult, int]] = []  # Faces lost lately (see _follow).
  tracked = 0  # Analysed frames since the last full-frame search.
  last_hw = None  # The size of the frame ``last`` was found in.
  new_tracks = itertools.count()  # The numbers of a video's new faces, in turn.
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
        boxes = [face.box for face in last]
        # A frame of another size (a stream that changed resolution) has the faces elsewhere.
        same_size = np.shape(frame)[:2] == last_hw
        track = (not src.is_images and same_size
                 and should_track(boxes, tracked, redetect_every))
        near = boxes if track else None
        faces = analyze_frame(frame, predictor, detector, stats, near)
        if not src.is_images:
          faces, missing = _follow(faces, last if same_size else [],
                                   missing if same_size else [], smooth, track_grace,
                                   predictor.class_names, new_tracks)
        last = faces
        last_hw = np.shape(frame)[:2]
        tracked = tracked + 1 if track else 0
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
# The whole loop
# ----------------------------------------------------------------------------


def check_outputs(source, **outputs: str | None) -> None:
  """Refuses, before anything is written, outputs that cannot or must not be written.

  ``outputs`` maps each flag name (``output``, ``csv``, ``json``) to its path
  or None. Raises ConfigError, naming the flag, when an output file is the
  source file, the annotated-image folder is the source folder (its images
  would be replaced by their annotated copies), a file output names an
  existing folder, two outputs name one file, or ``--output`` has the wrong
  kind of name for the source (a video for images, or no video extension for
  a video); OutputError when an output's folder cannot be created or written
  (the JSON, written last, would otherwise fail only after the whole run).
  ``source`` is what :func:`ferjax.sources.open_source` takes or an opened
  :class:`ferjax.sources.FrameSource`.
  """
  path_of_source, kind = _source_path(source)
  is_folder = bool(path_of_source) and os.path.isdir(path_of_source)
  file_outputs = {}  # flag -> whether that output is a file (else a folder of images).
  for flag, path in outputs.items():
    if not path:
      continue
    # Where the output is a file: --csv and --json always; --output for video and
    # cameras, and for a lone input image when it names an image file.
    file_output = flag != "output" or kind in ("video", "camera") or (
        kind == "images" and not is_folder and path.lower().endswith(IMAGE_EXTENSIONS))
    file_outputs[flag] = file_output
    if file_output and os.path.isdir(path):
      raise ConfigError(f"--{flag}={path} is a folder; give a file name")
    if file_output and path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
      # A folder not made yet: the file would be named '' inside it, failing at the end.
      raise ConfigError(f"--{flag}={path} names a folder; give a file name")
    if not path_of_source or not os.path.exists(path):
      continue
    if flag == "output" and not is_folder and os.path.isdir(path):
      path = os.path.join(path, os.path.basename(path_of_source))  # Where one image's copy goes.
      if not os.path.exists(path):
        continue
    if os.path.samefile(path, path_of_source):
      what = "the source folder: its images would be replaced by the annotated copies" \
          if is_folder else "the source itself: it would be overwritten"
      raise ConfigError(f"--{flag}={path} is {what}; choose another path")
  # The writers check these too, but only once the model has loaded, and the JSON only
  # after the whole run: a name that cannot work fails here, before the first frame.
  output = outputs.get("output")
  if output:
    ext = os.path.splitext(output)[1].lower()
    if kind in ("video", "camera") and ext not in VIDEO_CODECS:
      raise ConfigError(f"--output={output}: annotated video must end in "
                        f"{', '.join(VIDEO_CODECS)}")
    if kind == "images" and ext in VIDEO_CODECS:
      raise ConfigError(f"--output={output}: for image input, --output is a folder of "
                        "annotated images (or an image file for one input image), not a video")
  seen: dict[str, str] = {}  # Real path of each output file -> its flag.
  for flag, file_output in file_outputs.items():
    path = outputs[flag]
    if file_output:
      real = os.path.realpath(path)
      if real in seen:  # Both would write one partial file, and leave a mix of the two.
        raise ConfigError(f"--{flag}={path} is also --{seen[real]}; give each output its own "
                          "file")
      seen[real] = flag
    # A source of unknown kind (a stream URL given as a string) writes a video: a file.
    _check_writable(flag, path, folder=not file_output and kind == "images")


def _check_writable(flag: str, path: str, folder: bool) -> None:
  """Raises OutputError unless ``path`` (a file, or a folder of images) can be written.

  Missing folders are not created here: the nearest one that exists must be a
  folder that takes a new file (tried with a temporary file, so a read-only
  disk or a system folder is caught too).
  """
  target = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
  existing = nearest_existing(target)
  if not os.path.isdir(existing):
    if folder and existing == target:
      raise OutputError(f"--{flag}={path} is a file; for image input --output names a folder "
                        "(or, for one image, an image file)")
    raise OutputError(f"--{flag}={path}: cannot write there, {existing} is not a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".ferjax-probe-", dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise OutputError(f"--{flag}={path}: cannot write in {existing} ({e.strerror})") from None


def _source_path(source) -> tuple[str | None, str | None]:
  """The file or folder a source reads (None for a camera or a stream) and its kind if known."""
  if isinstance(source, FrameSource):
    if source.kind == "camera" or not os.path.exists(source.description):
      return None, source.kind
    return source.description, source.kind
  if not isinstance(source, (str, os.PathLike)):
    return None, "camera"  # A camera index.
  path = os.fspath(source)
  if path == "demo":
    return DEMO_CLIP, "video"
  if path.strip().isdigit():
    return None, "camera"
  if not os.path.exists(path):
    return None, None  # A stream URL or a missing path (open_source says which).
  if os.path.isdir(path) or path.lower().endswith(IMAGE_EXTENSIONS):
    return path, "images"
  return path, "video"


def run_pipeline(source, predictor, detector: FaceDetector | None = None, *,
                 output: str | None = None, csv_path: str | None = None,
                 json_path: str | None = None, display: bool = False, every: int = 1,
                 redetect_every: int = REDETECT_EVERY, max_frames: int | None = None,
                 smooth: float = 0.0, track_grace: int = TRACK_GRACE_FRAMES,
                 draw_fps: bool = True, window: str = "ferjax",
                 on_result: Callable[[FrameResult], None] | None = None) -> dict:
  """Runs the realtime pipeline over a source until it ends (or ``q`` in the window).

  Args:
    source: anything :func:`ferjax.sources.open_source` takes, or an opened
      :class:`ferjax.sources.FrameSource`.
    predictor: a :class:`ferjax.inference.Predictor`.
    detector: the face detector (default: ``FaceDetector(max_faces=predictor.max_faces)``).
    output: annotated output: a video file (``.mp4``, ``.mkv``, ``.avi``) for
      camera or video input; a folder for image input (or an image file when
      the input is one image).
    csv_path: one row per face per analysed frame.
    json_path: the settings, one entry per analysed frame (written as the run
      goes, not held in memory) and the summary.
    display: show a window; falls back to headless, with a warning, where
      there is no display.
    every: run detection and the model every N-th video frame, reusing the
      results in between.
    redetect_every: search the whole frame every N-th analysed frame and
      track the faces found in between (see :func:`analyze_video`).
    max_frames: stop after this many frames.
    smooth: each face's probabilities averaged over analysed frames, this much
      weight on the past (see :func:`analyze_video`); what is drawn, printed
      and written is the average. 0 takes each frame alone.
    track_grace: analysed frames a missed face stays pairable, keeping its
      track number (see :func:`analyze_video`).
    draw_fps: write the running FPS on drawn frames.
    window: the window's title.
    on_result: called with each analysed frame's results (e.g. to print them).

  Returns:
    :meth:`PipelineStats.summary` plus ``compile_seconds``, ``batch_sizes``
    (the predictor's compiled sizes), ``source``, ``displayed``, ``skipped``
    (files of an image folder that were not images or could not be decoded),
    ``tracks`` (:meth:`TrackTally.summary`: each face of a video, its frames and
    labels; empty for images) and the files written (``files``).

  Raises:
    ferjax.sources.SourceError: the source cannot be opened.
    ferjax.annotate.OutputError, ConfigError: an output cannot be written,
      ``smooth`` is not in ``[0, 1)``, ``track_grace`` is not a whole number
      of at least 0, or ``predictor`` or ``detector`` is not one.
  """
  import cv2

  check_outputs(source, output=output, csv=csv_path, json=json_path)
  check_smooth(smooth)
  check_track_grace(track_grace)
  check_predictor_and_detector(predictor, detector)  # Before any output is opened.
  src = open_source(source)
  writer = table = record = None
  summary = None
  finished = False  # Outputs replace earlier files only when the run ends normally.
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
    if json_path:
      record = ResultsJSON(json_path, {
          "source": src.description, "class_names": list(predictor.class_names),
          "checkpoint": getattr(predictor, "checkpoint", None), "every": every,
          "redetect_every": redetect_every, "smooth": smooth, "track_grace": track_grace})
    # After the outputs are checked (a bad name fails fast), before the first frame (so
    # compiling is not counted as frame time).
    compile_seconds = predictor.warmup()
    stats = PipelineStats()
    tally = TrackTally(predictor.class_names)
    want_drawing = writer is not None or display
    smooth_period = None
    last_tick = None
    stats.start()
    frames = analyze_video(src, predictor, detector, every=every,
                           redetect_every=redetect_every, max_frames=max_frames,
                           smooth=smooth, track_grace=track_grace, stats=stats)
    try:
      for result in frames:
        now = time.perf_counter()
        if last_tick is not None:
          # Exponential smoothing keeps the on-screen FPS readable.
          period = now - last_tick
          smooth_period = period if smooth_period is None else 0.9 * smooth_period + 0.1 * period
        last_tick = now
        if result.analyzed:
          tally.add(result)
        if result.analyzed and on_result is not None:
          on_result(result)
        if result.analyzed and (table is not None or record is not None):
          with stats.time("write"):
            if table is not None:
              table.write(result)
            if record is not None:
              record.write(_frame_record(result, predictor.class_names))
        if not want_drawing or _is_empty(result.frame):
          continue  # An empty frame (a camera starting up) has nothing to draw, write or show.
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
      if not src.is_live:
        # A file or folder cut short: its outputs are incomplete, so they are dropped
        # and files of the same names from an earlier run stay as they were.
        log.warning("interrupted after %d frames: outputs discarded", stats.frames)
        raise
      # Ctrl-C is how a headless camera (or stream) run ends: finish the outputs as usual.
      log.info("interrupted: stopping after %d frames", stats.frames)
    finally:
      stats.stop()
      frames.close()
    summary = stats.summary()
    summary.update(compile_seconds=round(compile_seconds, 3),
                   batch_sizes=list(getattr(predictor, "batch_sizes", ())),
                   source=src.description, displayed=bool(display), skipped=list(src.skipped),
                   tracks=tally.summary())
    finished = True
  finally:
    # Each step runs even if an earlier one fails. After a normal run the first failure
    # is raised once all have run; while another error is on its way, they are logged.
    _run_all(raise_first=finished, steps=[
        (lambda: writer.close(commit=finished)) if writer is not None else None,
        (lambda: table.close(commit=finished)) if table is not None else None,
        (lambda: record.close(commit=finished, summary=summary)) if record is not None else None,
        cv2.destroyAllWindows if display else None,
        src.close,
    ])
  # An annotated output that got no frame (e.g. a source that ended at once) was not written.
  files = [p for p in (output if writer is not None and writer.frames else None, csv_path,
                       json_path) if p]
  summary["files"] = files
  return summary


def _is_empty(frame) -> bool:
  """None or an empty array: what cameras hand out while starting."""
  return frame is None or np.size(frame) == 0


def _run_all(steps, raise_first: bool) -> None:
  """Calls each of ``steps`` (None entries skipped), whatever the others do.

  With ``raise_first`` the first error is raised after the last step; without,
  errors are logged.
  """
  error = None
  for step in steps:
    if step is None:
      continue
    try:
      step()
    except Exception as e:  # noqa: BLE001 - raised or logged below, after the other steps.
      if not raise_first:
        log.warning("while cleaning up: %s", e)
      error = error or e
  if error is not None and raise_first:
    raise error


def _frame_record(result: FrameResult, class_names: Sequence[str]) -> dict:
  return {"frame": result.index, "time_s": None if result.time_s is None
          else round(result.time_s, 4), "image": result.name,
          "faces": [face.to_dict(class_names) for face in result.faces]}
