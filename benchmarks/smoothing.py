r"""How much ``--smooth`` steadies the labels on real face clips, and what it changes.

  python -m benchmarks.smoothing
  python -m benchmarks.smoothing --sources=ferjax/assets/demo_face_clip.mkv,../shared/data/face-videos

For each clip (a video file, or every video in a folder) the realtime pipeline
(``ferjax.video.analyze_video``, default detector and tracking) runs once per
``--smooth`` value with the shipped weights (or ``--workdir``). Per setting it
reports the faces found, the tracks they form (distinct face numbers), the label
switches (a face whose label differs from its own in the last analysed frame:
the same ``track``) per 100 such face pairs, and how many faces keep the label
the first setting gives them. ``--track_grace`` sets how long a missed face is
waited for (``ferjax.video.TRACK_GRACE_FRAMES``; 0: not at all). Writes
benchmarks/results/smoothing.json.
"""

import os

from absl import app, flags

from benchmarks.common import clips, environment, fit, write_results
from ferjax import cli
from ferjax.sources import DEMO_CLIP

_SOURCES = flags.DEFINE_list("sources", [DEMO_CLIP], "Video files or folders of them.")
_SMOOTH = flags.DEFINE_list("smooth", ["0", "0.5", "0.7", "0.9"], "Smoothing weights to compare; "
                            "the first is the reference for the label agreement.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir. Default: the shipped "
                               "weights.")
_GRACE = flags.DEFINE_integer("track_grace", None, "Analysed frames a missed face stays "
                              "pairable. Default: ferjax.video.TRACK_GRACE_FRAMES.", lower_bound=0)
_OUT = flags.DEFINE_string("out", "benchmarks/results/smoothing.json", "JSON output.")


def label_switches(frames) -> tuple[int, int]:
  """(switches, pairs): faces whose track was in the last frame, and how many changed label."""
  switches = pairs = 0
  last = {}
  for result in frames:
    for face in result.faces:
      if face.track in last:
        pairs += 1
        switches += int(last[face.track] != face.label_index)
    last = {face.track: face.label_index for face in result.faces}
  return switches, pairs


@cli.exit_on_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  weights = cli.number_list(_SMOOTH)
  from ferjax.inference import Predictor
  from ferjax.video import TRACK_GRACE_FRAMES, analyze_video, check_smooth

  for value in weights:
    check_smooth(value)
  cli.quiet_libraries()  # Library notes would land inside the table.
  predictor = Predictor(_WORKDIR.value)
  predictor.warmup()
  grace = TRACK_GRACE_FRAMES if _GRACE.value is None else _GRACE.value
  results = environment(checkpoint=str(predictor.checkpoint), track_grace=grace, clips={})
  print(f"{'clip':<40}{'smooth':>7}{'faces':>7}{'tracks':>7}{'switches /100':>15}"
        f"{'same label %':>14}")
  for path in clips(_SOURCES.value):
    rows, reference = {}, None
    for value in weights:
      frames = [r for r in analyze_video(path, predictor, smooth=value, track_grace=grace)
                if r.analyzed]
      labels = [face.label_index for r in frames for face in r.faces]
      reference = labels if reference is None else reference
      switches, pairs = label_switches(frames)
      rows[str(value)] = {
          "faces": len(labels), "tracks": len({f.track for r in frames for f in r.faces}),
          "pairs": pairs, "switches": switches,
          "switches_per_100_pairs": 100 * switches / max(pairs, 1),
          "same_label_as_first_pct": 100 * sum(a == b for a, b in zip(labels, reference))
          / max(len(labels), 1)}
    results["clips"][path] = {"frames": len(frames), "rows": rows}
    name = fit(os.path.basename(path), 38)
    for value, row in rows.items():
      print(f"{name:<40}{value:>7}{row['faces']:>7}{row['tracks']:>7}"
            f"{row['switches_per_100_pairs']:>15.1f}"
            f"{row['same_label_as_first_pct']:>14.1f}")
  write_results(results, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
