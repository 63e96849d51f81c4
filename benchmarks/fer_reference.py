r"""Frames per second of the ``fer`` package (Haar mode) on a video, as JSON on stdout.

  /tmp/fervenv/bin/python benchmarks/fer_reference.py --source=ferjax/assets/demo_face_clip.mkv

The comparison side of benchmarks/realtime_fps.py, run in a separate
interpreter that has ``fer`` and TensorFlow (see benchmarks/README.md for the
venv); it imports nothing from ferjax. The clip is decoded into memory first
(decoding is not timed), ``FER(mtcnn=False).detect_emotions`` runs on the
first ``--warmup`` frames untimed, then on every frame, ``--repeats`` times
over. The last line of stdout is the JSON result.
"""

import json
import os
import platform
import sys
import time

import cv2
import numpy as np
from absl import app, flags

_SOURCE = flags.DEFINE_string("source", "ferjax/assets/demo_face_clip.mkv", "A video file.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the clip.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed frames first (interpreter and caches).")


def read_frames(path: str) -> list[np.ndarray]:
  """Every frame of the video at ``path``, decoded into memory."""
  capture = cv2.VideoCapture(path)
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(frame)
  capture.release()
  if not frames:
    raise SystemExit(f"{path}: no frames could be read")
  return frames


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow's C++ start-up chatter would otherwise fill stderr; keep warnings and errors.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import fer
  import tensorflow as tf
  from fer.fer import FER  # The package's __init__ does not export FER in 25.10.3.

  frames = read_frames(_SOURCE.value)
  load_before = os.getloadavg()
  start = time.perf_counter()
  detector = FER(mtcnn=False)
  init_s = time.perf_counter() - start
  for frame in frames[:_WARMUP.value]:
    detector.detect_emotions(frame)
  faces = frames_with_face = 0
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    for frame in frames:
      found = detector.detect_emotions(frame)
      faces += len(found)
      frames_with_face += bool(found)
  seconds = time.perf_counter() - start
  timed = len(frames) * _REPEATS.value
  result = {
      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load_before,
      "load_average_after": os.getloadavg(),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "python": platform.python_version(), "fer": fer.__version__,
      "tensorflow": tf.__version__, "opencv": cv2.__version__,
      "settings": "FER(mtcnn=False): Haar cascade on the full frame, scale_factor 1.1, "
                  "min_neighbors 5, min_face_size 50; quantised TFLite classifier, 64x64",
      "source": _SOURCE.value, "clip_frames": len(frames), "repeats": _REPEATS.value,
      "warmup_frames": min(_WARMUP.value, len(frames)), "init_s": round(init_s, 3),
      "frames": timed, "faces": faces, "frames_with_face": frames_with_face,
      "seconds": round(seconds, 4), "fps": round(timed / seconds, 2),
      "ms_per_frame": round(1e3 * seconds / timed, 3)}
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)
