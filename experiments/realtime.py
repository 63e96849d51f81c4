r"""Facial expressions in realtime: webcam, video file, image or folder of images.

  python -m experiments.realtime                                # webcam 0, shipped weights
  python -m experiments.realtime --source=demo --no_display --output=demo.mp4   # no camera
  python -m experiments.realtime --workdir=runs/acnn_alstm --source=clip.mp4 \
      --no_display --output=annotated.mp4 --csv=faces.csv --json=faces.json

Each frame: Haar face detection → 48x48 crops → the model. The window shows
boxes, the top label, a probability bar per emotion and the FPS; ``q`` quits.
Without a display it runs headless. At the end it prints frames processed,
faces found and FPS with the time per stage.
"""

import logging
import os
import sys

from absl import flags

from ferjax import cli

log = logging.getLogger("ferjax.realtime")

_SOURCE = flags.DEFINE_string("source", "0", "Camera index, video file, image file, folder of "
                              "images, or 'demo' (a short face clip shipped with ferjax).")
_PRINT = flags.DEFINE_bool("print_faces", None, "Print each analysed frame's faces (label and "
                           "probabilities). Default: on when running without a window.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir. Default: the "
                               "weights shipped in ferjax/weights/default.")
_WHICH = flags.DEFINE_string("which", "best", "best, latest or a step number.")
flags.DEFINE_alias("checkpoint", "workdir")  # The earlier name of --workdir here.
_OUTPUT = flags.DEFINE_string("output", None, "Annotated output: a video (.mp4, .mkv, .avi) for "
                              "camera/video input, a folder for image input.")
_CSV = flags.DEFINE_string("csv", None, "Write one row per face (frame, time, box, label, all "
                           "probabilities) here.")
_JSON = flags.DEFINE_string("json", None, "Write per-frame results and the run summary here.")
_NO_DISPLAY = flags.DEFINE_bool("no_display", False, "Run without a window (automatic when "
                                "there is no display).")
_MAX_FACES = flags.DEFINE_integer("max_faces", 8, "Faces per frame (largest first); also the "
                                  "largest batch the model is compiled for.", lower_bound=1)
_EVERY = flags.DEFINE_integer("every", 1, "Detect and classify every N-th frame; reuse the "
                              "results in between.", lower_bound=1)
_REDETECT = flags.DEFINE_integer("redetect_every", 5, "Search the whole frame for faces every "
                                 "N-th analysed frame and track the faces found in between (a "
                                 "search near each, a fraction of the cost); 1 searches every "
                                 "frame. New faces appear within N-1 frames.", lower_bound=1)
_SMOOTH = flags.DEFINE_float("smooth", 0.0, "Steadier labels on a video or camera: average each "
                            "face's probabilities with the same face's in the last analysed "
                            "frame it was found in, this much weight on the past (0.7: a face "
                            "whose probabilities switch outright to another class takes its "
                            "label on the second frame); 0 takes each frame alone. At least 0, "
                            "below 1.",
                            lower_bound=0.0)
flags.register_validator("smooth", lambda value: value < 1,
                         message="--smooth must be below 1 (1 would never take a new frame)")
_GRACE = flags.DEFINE_integer("track_grace", 5, "On a video or camera: analysed frames a face "
                              "the detector missed is waited for at its last place; found "
                              "there again, it keeps its number and its smoothing. 0: a missed "
                              "face comes back as a new one.", lower_bound=0)
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Stop after this many frames.",
                                   lower_bound=1)
_SCALE = flags.DEFINE_float("scale_factor", 1.2, "Haar cascade: step between search scales "
                            "(smaller finds a few more faces, slower).")
_NEIGHBORS = flags.DEFINE_integer("min_neighbors", 5, "Haar cascade: hits a face needs; higher "
                                  "means fewer false faces.", lower_bound=0)
_MIN_SIZE = flags.DEFINE_integer("min_size", 48, "Smallest face side in frame pixels; the "
                                "detector's 24-px window makes 24 x --downscale the least that "
                                "takes effect (lower --downscale for smaller faces).",
                                lower_bound=1)
_MARGIN = flags.DEFINE_float("margin", 0.1, "Fraction of the face box added on every side of "
                             "the crop.", lower_bound=0)
_DOWNSCALE = flags.DEFINE_float("downscale", 2.0, "Detect faces on the frame shrunk by this "
                                "factor (1 = full size; faster when larger).", lower_bound=1)


@cli.exit_on_errors
def main(argv):
  cli.start(argv)
  if hasattr(sys.stdout, "reconfigure"):
    # Image names that are not UTF-8 are printed escaped, as stderr does, not a crash.
    sys.stdout.reconfigure(errors="backslashreplace")
  # FFmpeg prints its own lines (e.g. "moov atom not found") above ours for a video it
  # cannot read; ferjax names the file and the fault itself. Read when OpenCV first
  # starts FFmpeg, so set before the source opens; a user's own setting is kept.
  os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET.
  from ferjax.sources import open_source
  from ferjax.video import check_outputs

  # The source and the outputs first: a wrong --source, or an output that cannot or must
  # not be written, fails at once, before the model loads.
  with open_source(_SOURCE.value) as source:
    check_outputs(source, output=_OUTPUT.value, csv=_CSV.value, json=_JSON.value)
    _run(source)


def _run(source):
  from ferjax.faces import FaceDetector
  from ferjax.inference import Predictor
  from ferjax.video import format_summary, run_pipeline

  detector = FaceDetector(scale_factor=_SCALE.value, min_neighbors=_NEIGHBORS.value,
                          min_size=_MIN_SIZE.value, margin=_MARGIN.value,
                          max_faces=_MAX_FACES.value, downscale=_DOWNSCALE.value)
  predictor = Predictor(_WORKDIR.value, _WHICH.value, max_faces=_MAX_FACES.value)
  show = not _NO_DISPLAY.value
  if show:
    from ferjax.annotate import display_available
    show, why = display_available()
    if not show:
      log.warning("no display (%s): running headless", why)
  print_faces = (not show) if _PRINT.value is None else _PRINT.value
  names = predictor.class_names

  def print_result(result):
    when = "" if result.time_s is None else f" {result.time_s:6.2f}s"
    label = result.name or f"frame {result.index:5d}{when}"
    faces = "; ".join(
        ("" if face.track is None else f"#{face.track} ")
        + f"{face.label} {face.score:.2f} at {tuple(map(int, face.box))} ["
        + " ".join(f"{n[:3]} {p:.2f}" for n, p in zip(names, face.probs)) + "]"
        for face in result.faces) or "no face"
    print(f"{label}: {faces}", flush=True)

  summary = run_pipeline(source, predictor, detector, output=_OUTPUT.value, csv_path=_CSV.value,
                         json_path=_JSON.value, display=show, every=_EVERY.value,
                         redetect_every=_REDETECT.value, smooth=_SMOOTH.value,
                         track_grace=_GRACE.value, max_frames=_MAX_FRAMES.value,
                         on_result=print_result if print_faces else None)
  print(format_summary(summary))
  if summary["files"]:
    print("wrote " + ", ".join(summary["files"]))


if __name__ == "__main__":
  cli.run(main)
