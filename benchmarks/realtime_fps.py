r"""Frames per second of the realtime pipeline on a clip, headless, against the ``fer`` package.

  python -m benchmarks.realtime_fps --repeats=10
  python -m benchmarks.realtime_fps --repeats=10 --fer_python=/tmp/fervenv/bin/python

The clip (default ferjax/assets/demo_face_clip.mkv: 640x480, 65 frames, one
face) is decoded into memory once, so neither side times the video decoder.
``ferjax.video.run_pipeline`` (no display, no outputs, so no drawing) then runs
over it ``--repeats`` times in a row: at the defaults (a full-frame face search
on every 5th frame, tracking the faces found in between) and, searching every
frame in full, at each ``--downscales`` value. It reports frames per second and
milliseconds per stage. Per setting, a short run over the first ``--warmup`` frames comes first
and is not counted (the model is also compiled before it, as run_pipeline
always does).

With ``--fer_python`` (the interpreter of a venv with ``fer``; TensorFlow must
never enter ferjax's own environment) benchmarks/fer_reference.py runs the same
frames through ``FER(mtcnn=False).detect_emotions``, with its own untimed
warm-up frames, and the ratio ferjax fps / fer fps is reported. Writes
benchmarks/results/realtime_fps.json with the load average, date, machine and
versions.
"""

import json
import os
import subprocess
import sys
import time

import cv2
from absl import app, flags
from flax import nnx

from benchmarks.common import environment, write_results
from ferjax import cli
from ferjax import hostmem
from ferjax.data import FER2013_CLASSES
from ferjax.faces import FaceDetector
from ferjax.inference import DEFAULT_WEIGHTS, Predictor
from ferjax.models import create_model
from ferjax.sources import DEMO_CLIP, FrameSource, open_source
from ferjax.video import REDETECT_EVERY, STAGES, run_pipeline

_HERE = os.path.dirname(os.path.abspath(__file__))

_SOURCE = flags.DEFINE_string("source", DEMO_CLIP, "A video file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir. Default: the "
                               "shipped weights in ferjax/weights/default when present, "
                               "else a fresh acnn_alstm (speed does not depend on weights).")
_WHICH = flags.DEFINE_string("which", "best", "best, latest or a step number.")
flags.DEFINE_alias("checkpoint", "workdir")  # The earlier name of --workdir here.
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed passes over the clip, per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed frames before each timed run.")
_DOWNSCALES = flags.DEFINE_list("downscales", ["1", "2", "3"], "Detector --downscale values "
                                "to time besides the default settings.")
_FER_PYTHON = flags.DEFINE_string("fer_python", None, "Python of a venv with fer==25.10.3, "
                                  "e.g. /tmp/fervenv/bin/python; runs fer_reference.py for "
                                  "the comparison.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/realtime_fps.json", "JSON output.")


class _Replay:
  """A VideoCapture look-alike that hands out in-memory frames, ``repeats`` times over."""

  def __init__(self, frames, repeats: int = 1):
    self._frames = frames
    self._left = repeats * len(frames)
    self._i = 0

  def read(self):
    if self._left <= 0:
      return False, None
    frame = self._frames[self._i % len(self._frames)]
    self._i += 1
    self._left -= 1
    return True, frame

  def release(self):
    self._left = 0


def replay_source(frames, repeats: int, fps: float | None) -> FrameSource:
  """A video FrameSource over in-memory frames: run_pipeline unchanged, the decoder left out."""
  return FrameSource("video", f"{len(frames)} frames in memory x{repeats}",
                     capture=_Replay(frames, repeats), fps=fps)


def load_predictor() -> tuple[Predictor, str]:
  """The predictor to time and a description of its model."""
  path = _WORKDIR.value
  if path is None and os.path.isdir(os.path.join(DEFAULT_WEIGHTS, "checkpoints")):
    path = DEFAULT_WEIGHTS
  if path is not None:
    predictor = Predictor(path, _WHICH.value)
    return predictor, f"{predictor.meta.get('model')} ({path}, step {predictor.meta.get('step')})"
  model = create_model("acnn_alstm", num_classes=len(FER2013_CLASSES),
                       rngs=nnx.Rngs(params=0, dropout=1))
  return Predictor.from_model(model, FER2013_CLASSES), "acnn_alstm (fresh init, no weights shipped)"


def read_clip(path: str):
  """The clip's frames, its frame rate and the decoder's milliseconds per frame."""
  start = time.perf_counter()
  with open_source(path) as source:
    frames = [frame for frame, _, _ in source]
    fps = source.fps
  return frames, fps, 1e3 * (time.perf_counter() - start) / len(frames)


def time_detector(frames, clip_fps, predictor, detector, redetect_every: int) -> dict:
  """run_pipeline's summary over the clip ``--repeats`` times, after an untimed warm-up."""
  if _WARMUP.value > 0:
    run_pipeline(replay_source(frames[:_WARMUP.value], 1, clip_fps), predictor, detector,
                 redetect_every=redetect_every)
  summary = run_pipeline(replay_source(frames, _REPEATS.value, clip_fps), predictor, detector,
                         redetect_every=redetect_every)
  summary.pop("files", None)
  summary.pop("skipped", None)
  summary.update(detector=repr(detector), redetect_every=redetect_every)
  return summary


def run_fer(python: str, clip_frames: int) -> dict:
  """fer_reference.py's JSON, or ``{"error": ...}`` when it failed."""
  command = [python, os.path.join(_HERE, "fer_reference.py"), f"--source={_SOURCE.value}",
             f"--repeats={_REPEATS.value}", f"--warmup={_WARMUP.value}"]
  done = subprocess.run(command, check=False, capture_output=True, text=True)
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode != 0 or not lines:
    return {"error": f"exit status {done.returncode}", "command": command,
            "stderr_tail": done.stderr[-2000:]}
  result = json.loads(lines[-1])
  result["command"] = command
  if result.get("clip_frames") != clip_frames:
    # Different OpenCV builds may decode a different number of frames; say so.
    result["note"] = f"fer decoded {result.get('clip_frames')} frames, ferjax {clip_frames}"
  return result


@cli.exit_on_errors
def main(argv):
  hostmem.retain_freed_memory()  # As the entrypoints do; before JAX starts.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  downscales = cli.number_list(_DOWNSCALES, minimum=1.0)
  cli.quiet_libraries()  # Library notes would land inside the table.
  results = environment(opencv=cv2.__version__)
  frames, clip_fps, decode_ms = read_clip(_SOURCE.value)
  predictor, model = load_predictor()
  results.update(source=_SOURCE.value, clip_frames=len(frames),
                 frame_size=list(frames[0].shape[:2]), decode_ms_per_frame=decode_ms,
                 repeats=_REPEATS.value, warmup_frames=min(_WARMUP.value, len(frames)),
                 model=model, compile_s=predictor.warmup(), ferjax={})
  # The defaults (full search every REDETECT_EVERY-th frame, tracking between), then a full
  # search on every frame at each --downscales value.
  settings = [(f"default (redetect {REDETECT_EVERY})", FaceDetector(max_faces=predictor.max_faces),
               REDETECT_EVERY)]
  for value in downscales:
    settings.append((f"downscale={value:g}, redetect 1",
                     FaceDetector(max_faces=predictor.max_faces, downscale=value), 1))
  for label, detector, redetect_every in settings:
    results["ferjax"][label] = time_detector(frames, clip_fps, predictor, detector,
                                             redetect_every)
  if _FER_PYTHON.value:
    results["fer"] = run_fer(_FER_PYTHON.value, len(frames))

  fer_fps = results.get("fer", {}).get("fps")
  stages = [s for s in STAGES if any(s in r["ms_per_call"] for r in results["ferjax"].values())]
  print(f"model: {model}; clip {len(frames)} frames x{_REPEATS.value} from memory "
        f"(decoding, {decode_ms:.2f} ms/frame, and {results['warmup_frames']} warm-up frames "
        "not counted)")
  header = f"{'ferjax detector':<30}{'fps':>8}{'faces':>7}" + "".join(
      f"{s + ' ms':>11}" for s in stages) + (f"{'x fer':>8}" if fer_fps else "")
  print(header)
  for label, r in results["ferjax"].items():
    cells = "".join(f"{r['ms_per_call'].get(s, 0.0):>11.3f}" for s in stages)
    ratio = f"{r['fps'] / fer_fps:>8.2f}" if fer_fps else ""
    print(f"{label:<30}{r['fps']:>8.1f}{r['faces']:>7}{cells}{ratio}")
  if fer_fps:
    fer = results["fer"]
    print(f"{'fer ' + fer['fer'] + ' (Haar, TFLite)':<30}{fer_fps:>8.1f}{fer['faces']:>7}"
          f"   ({fer['ms_per_frame']:.2f} ms/frame, {fer['frames_with_face']} of "
          f"{fer['frames']} frames with a face)")
  elif "fer" in results:
    # The comparison was asked for and is missing: keep the earlier results file, fail.
    print(f"fer reference failed: {results['fer']['error']}\n{results['fer']['stderr_tail']}")
    sys.exit(f"not written: {_OUT.value} (the fer comparison failed; fix --fer_python or "
             "leave it out)")
  else:
    print("no fer comparison: pass --fer_python=PATH (a venv with fer==25.10.3; see "
          "benchmarks/README.md)")
  write_results(results, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
