r"""What tracking between full-frame face searches costs in faces, and what it saves in time.

  python -m benchmarks.tracking
  python -m benchmarks.tracking --sources=ferjax/assets/demo_face_clip.mkv,../shared/data/face-videos

For each clip (a video file, or every video in a folder), the detector runs over
every frame with a full-frame search (``redetect_every`` 1, the reference) and
with a full search on every N-th frame and ``FaceDetector.detect_near`` in
between, for each ``--redetect`` value. Per setting it reports the faces found,
how many of the reference's faces were found at the same place (intersection
over union > 0.5), the faces tracking found that the reference did not, and the
detector's milliseconds per frame. Only detection runs: no model. Writes
benchmarks/results/tracking.json.
"""

import os
import time

from absl import app, flags

from benchmarks.common import clips, environment, fit, write_results
from ferjax import cli
from ferjax.faces import FaceDetector, iou, should_track, to_gray
from ferjax.sources import DEMO_CLIP, open_source

_SOURCES = flags.DEFINE_list("sources", [DEMO_CLIP], "Video files or folders of them.")
_REDETECT = flags.DEFINE_list("redetect", ["3", "5", "10"], "Full-search intervals to compare "
                              "with a full search on every frame.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/tracking.json", "JSON output.")


def run(grays, detector: FaceDetector, redetect_every: int):
  """Boxes per frame and seconds spent, as the pipeline schedules searches."""
  boxes, previous, tracked, seconds = [], [], 0, 0.0
  for gray in grays:
    start = time.perf_counter()
    track = should_track(previous, tracked, redetect_every)
    found = detector.detect_near(gray, previous) if track else detector.detect(gray)
    seconds += time.perf_counter() - start
    tracked = tracked + 1 if track else 0
    boxes.append(found)
    previous = found
  return boxes, seconds


@cli.exit_on_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  intervals = cli.number_list(_REDETECT, int, minimum=1)
  cli.quiet_libraries()  # Library notes would land inside the table.
  detector = FaceDetector()
  results = environment(detector=repr(detector), clips={})
  print(f"{'clip':<40}{'redetect':>9}{'faces':>7}{'same':>6}{'extra':>6}{'detect ms':>11}")
  for path in clips(_SOURCES.value):
    with open_source(path) as source:
      grays = [to_gray(frame) for frame, _, _ in source]
    reference, seconds = run(grays, detector, 1)
    rows = {"1": {"faces": sum(map(len, reference)), "ms_per_frame": 1e3 * seconds / len(grays)}}
    for interval in intervals:
      boxes, seconds = run(grays, detector, interval)
      same = sum(sum(any(iou(a, b) > 0.5 for b in got) for a in ref)
                 for ref, got in zip(reference, boxes))
      extra = sum(sum(all(iou(b, a) <= 0.5 for a in ref) for b in got)
                  for ref, got in zip(reference, boxes))
      rows[str(interval)] = {"faces": sum(map(len, boxes)), "same_as_full_search": same,
                             "extra": extra, "ms_per_frame": 1e3 * seconds / len(grays)}
    results["clips"][path] = {"frames": len(grays), "size": list(grays[0].shape), "rows": rows}
    name = fit(os.path.basename(path), 38)
    for value, row in rows.items():
      print(f"{name:<40}{value:>9}{row['faces']:>7}{row.get('same_as_full_search', row['faces']):>6}"
            f"{row.get('extra', 0):>6}{row['ms_per_frame']:>11.2f}")
  write_results(results, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
