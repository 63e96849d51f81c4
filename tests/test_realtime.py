"""The realtime pipeline on a real clip: sources, per-frame results, writers and the script."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from ferjax import annotate, sources, video
from ferjax.errors import ConfigError, FerjaxError
from ferjax.faces import Box, FaceDetector, to_gray
from ferjax.inference import Predictor
from test_inference import CLIP, read_clip, train_tiny_run

# The tests here share a trained run (a module fixture): one pytest-xdist worker runs
# them all, so it is trained once.
pytestmark = pytest.mark.xdist_group("test_realtime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_FRAMES = 65


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  return train_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def clip_frames():
  return read_clip()


@pytest.fixture(scope="module")
def predictor(tiny_run):
  p = Predictor(tiny_run[0], max_faces=4)
  p.warmup()
  return p


def test_analyze_frame_finds_and_classifies_the_face(predictor, clip_frames):
  results = video.analyze_frame(clip_frames[0], predictor, FaceDetector())
  assert len(results) == 1
  face = results[0]
  assert face.probs.shape == (7,) and abs(face.probs.sum() - 1) < 1e-5
  assert face.label == predictor.class_names[face.label_index]
  assert face.score == pytest.approx(face.probs.max())
  assert json.loads(json.dumps(face.to_dict(predictor.class_names)))["box"] == list(face.box)
  # The probabilities are the predictor's for the detector's crop of that box (same margin).
  detector = FaceDetector()
  gray = to_gray(clip_frames[0])
  boxes = detector.detect(gray)
  assert [face.box] == boxes
  np.testing.assert_allclose(face.probs, predictor.predict_faces(detector.crops(gray, boxes))[0],
                             rtol=1e-6)


def test_empty_and_faceless_frames_give_no_results(predictor):
  detector = FaceDetector()
  assert video.analyze_frame(None, predictor, detector) == []
  assert video.analyze_frame(np.zeros((0, 0, 3), np.uint8), predictor, detector) == []
  assert video.analyze_frame(np.full((480, 640, 3), 90, np.uint8), predictor, detector) == []
  with pytest.raises(ValueError, match="uint8"):
    video.analyze_frame(np.zeros((48, 48, 3), np.float64), predictor, detector)


def test_frames_with_different_face_counts_compile_once(predictor, clip_frames):
  detector = FaceDetector(max_faces=4)
  one = clip_frames[0]
  two = np.concatenate([one, clip_frames[30]], axis=1)
  blank = np.zeros_like(one)
  before = predictor.trace_count
  counts = [len(video.analyze_frame(f, predictor, detector)) for f in (one, two, blank, one, two)]
  assert counts == [1, 2, 0, 1, 2]
  assert predictor.trace_count == before == len(predictor.batch_sizes)  # All from warmup.


def test_analyze_video_over_the_clip(predictor):
  stats = video.PipelineStats()
  stats.start()
  results = list(video.analyze_video(CLIP, predictor, every=1, stats=stats))
  stats.stop()
  assert len(results) == CLIP_FRAMES and [r.index for r in results] == list(range(CLIP_FRAMES))
  assert sum(1 for r in results if r.faces) >= CLIP_FRAMES - 2
  assert results[30].time_s == pytest.approx(1.0)  # 30 fps clip.
  summary = stats.summary()
  assert summary["frames"] == CLIP_FRAMES and summary["fps"] > 0
  assert {"read", "detect", "crop", "predict"} <= set(summary["ms_per_call"])


def test_every_n_frames_reuses_results(predictor):
  results = list(video.analyze_video(CLIP, predictor, every=3, max_frames=7))
  assert [r.analyzed for r in results] == [True, False, False, True, False, False, True]
  assert results[1].faces is results[0].faces


def test_tracking_between_full_searches(predictor):
  from ferjax.faces import iou

  stats = {n: video.PipelineStats() for n in (1, 5)}
  runs = {n: list(video.analyze_video(CLIP, predictor, redetect_every=n, stats=stats[n]))
          for n in (1, 5)}
  # Every analysed frame searched in full, or one in five (the face is in every frame).
  assert stats[1].full_detections == CLIP_FRAMES
  assert stats[5].full_detections == -(-CLIP_FRAMES // 5)
  assert stats[5].summary()["full_detections"] == stats[5].full_detections
  # Tracking finds the face where the full search does, at the same place.
  for full, tracked in zip(runs[1], runs[5]):
    assert len(full.faces) == len(tracked.faces)
    for a, b in zip(full.faces, tracked.faces):
      assert iou(a.box, b.box) > 0.7


def test_a_frame_without_tracked_faces_is_searched_in_full(predictor, clip_frames, tmp_path):
  import cv2

  blank = np.full_like(clip_frames[0], 90)
  # Images are never tracked: each is a new scene.
  folder = tmp_path / "images"
  folder.mkdir()
  for i, frame in enumerate([clip_frames[0], clip_frames[1], blank]):
    cv2.imwrite(str(folder / f"{i}.png"), frame)
  stats = video.PipelineStats()
  results = list(video.analyze_video(str(folder), predictor, redetect_every=5, stats=stats))
  assert [len(r.faces) for r in results] == [1, 1, 0] and stats.full_detections == 3
  # In a video, faceless frames are searched in full until a face turns up, then tracked.
  clip = tmp_path / "late_face.mkv"
  writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"FFV1"), 30.0, (640, 480))
  for frame in [blank] * 3 + clip_frames[:4]:
    writer.write(frame)
  writer.release()
  stats = video.PipelineStats()
  results = list(video.analyze_video(str(clip), predictor, redetect_every=5, stats=stats))
  assert [len(r.faces) for r in results] == [0, 0, 0, 1, 1, 1, 1]
  assert stats.full_detections == 4
  with pytest.raises(FerjaxError, match="redetect_every"):
    video.analyze_video(CLIP, predictor, redetect_every=0)


def _face(box, probs, names=tuple("abc")):
  probs = np.asarray(probs, np.float32)
  top = int(probs.argmax())
  return video.FaceResult(Box(*box), probs, names[top], top, float(probs[top]))


def test_smoothing_averages_each_face_with_its_match_in_the_last_frame():
  from ferjax.faces import iou

  names = tuple("abc")
  last = [_face((100, 100, 80, 80), [0.8, 0.1, 0.1]), _face((400, 100, 60, 60), [0.1, 0.1, 0.8])]
  now = [_face((104, 98, 80, 80), [0.3, 0.6, 0.1]),    # The first face, moved a little.
         _face((250, 300, 50, 50), [0.2, 0.7, 0.1]),    # A new face: overlaps neither.
         _face((405, 105, 60, 60), [0.1, 0.5, 0.4])]    # The second face.
  out = video.smooth_faces(now, last, 0.7, names)
  assert [f.box for f in out] == [f.box for f in now]
  np.testing.assert_allclose(out[0].probs, 0.7 * last[0].probs + 0.3 * now[0].probs, rtol=1e-6)
  # Its own frame says b (0.6), the average still a (0.65 against 0.25): the label holds.
  assert (now[0].label, out[0].label, out[0].label_index) == ("b", "a", 0)
  assert out[0].score == pytest.approx(0.65) and out[0].probs.dtype == np.float32
  assert out[1] is now[1]
  np.testing.assert_allclose(out[2].probs, 0.7 * last[1].probs + 0.3 * now[2].probs, rtol=1e-6)
  assert out[2].label == "c"
  # One past face per face: of two faces over the same past one, the one overlapping it
  # more takes it (here the second listed), the other keeps its own probabilities.
  crowd = [_face((110, 110, 90, 90), [0, 1, 0]), _face((100, 102, 80, 80), [0, 0, 1])]
  assert iou(crowd[0].box, last[0].box) < iou(crowd[1].box, last[0].box)
  out = video.smooth_faces(crowd, last[:1], 0.5, names)
  assert out[0] is crowd[0]
  np.testing.assert_allclose(out[1].probs, [0.4, 0.05, 0.55], rtol=1e-6)
  # Too little overlap (IoU under 0.3) is another face; weight 0 changes nothing.
  far = [_face((150, 150, 80, 80), [0, 1, 0])]
  assert iou(far[0].box, last[0].box) < video.SAME_FACE_MIN_IOU
  assert video.smooth_faces(far, last, 0.7, names)[0] is far[0]
  assert all(a is b for a, b in zip(video.smooth_faces(now, last, 0.0, names), now, strict=True))


def test_a_face_missing_for_a_few_frames_keeps_its_track_and_its_smoothing():
  import itertools

  names = tuple("ab")
  tracks = itertools.count()

  def follow(faces, previous, missing, grace=2):
    return video._follow(faces, previous, missing, 0.5, grace, names, tracks)

  first, missing = follow([_face((100, 100, 80, 80), [0.9, 0.1])], [], [])
  assert [f.track for f in first] == [0] and missing == []
  # Two analysed frames without it: it waits where it was, a frame older each time.
  gone, missing = follow([], first, missing)
  assert gone == [] and [(f.track, age) for f, age in missing] == [(0, 1)]
  gone, missing = follow([], gone, missing)
  assert [(f.track, age) for f, age in missing] == [(0, 2)]
  # Found again near its last box: the same number, smoothed with what it last showed.
  back, missing = follow([_face((104, 100, 80, 80), [0.2, 0.8])], gone, missing)
  assert [f.track for f in back] == [0] and missing == []
  np.testing.assert_allclose(back[0].probs, [0.55, 0.45], rtol=1e-6)
  assert back[0].label == "a"
  # Beside a face of the last frame, a lost face pairs as well, one to one.
  two, missing = follow([_face((400, 100, 60, 60), [0.5, 0.5])], back, [])
  assert [f.track for f in two] == [1] and [(f.track, age) for f, age in missing] == [(0, 1)]
  both, missing = follow([_face((402, 100, 60, 60), [0.5, 0.5]),
                          _face((100, 100, 80, 80), [0.5, 0.5])], two, missing)
  assert [f.track for f in both] == [1, 0] and missing == []
  # Missing for more than the grace: forgotten, and found again it is a new face.
  gone, missing = follow([], both, [])
  for _ in range(2):
    gone, missing = follow([], gone, missing)
  assert missing == []
  again, _ = follow([_face((100, 100, 80, 80), [0.5, 0.5])], gone, missing)
  assert [f.track for f in again] == [2]
  # Grace 0: a face missing from the last frame is gone.
  _, missing = follow([], again, [], grace=0)
  assert missing == []


def test_faces_keep_their_track_number_while_found_in_every_frame(predictor, clip_frames,
                                                                 tmp_path):
  import cv2

  blank = np.full_like(clip_frames[0], 90)
  clip = tmp_path / "gap.mkv"
  writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"FFV1"), 30.0, (640, 480))
  for frame in clip_frames[:3] + [blank] + clip_frames[3:5]:
    writer.write(frame)
  writer.release()
  # The face keeps its number over a frame without it (TRACK_GRACE_FRAMES); with no
  # grace it comes back as a new face.
  tracks = [[[f.track for f in r.faces] for r in video.analyze_video(str(clip), predictor,
                                                                    track_grace=grace)]
            for grace in (video.TRACK_GRACE_FRAMES, 0)]
  assert tracks == [[[0], [0], [0], [], [0], [0]], [[0], [0], [0], [], [1], [1]]]
  assert video.TRACK_GRACE_FRAMES >= 1
  for bad in (-1, 1.5, "2", True):
    with pytest.raises(ConfigError, match="track_grace must be a whole number of at least 0"):
      video.analyze_video(str(clip), predictor, track_grace=bad)
  # The pipeline refuses it before writing anything.
  with pytest.raises(ConfigError, match="track_grace must be a whole number of at least 0"):
    video.run_pipeline(str(clip), predictor, csv_path=str(tmp_path / "faces.csv"), track_grace=-1)
  assert not os.path.exists(tmp_path / "faces.csv")
  assert all(f.track is None for f in video.analyze_frame(clip_frames[0], predictor,
                                                          FaceDetector()))
  # Pairing: most overlap first, one to one, none below the bound.
  boxes = [Box(100, 100, 80, 80), Box(400, 100, 60, 60)]
  assert video.pair_faces([Box(405, 105, 60, 60), Box(104, 98, 80, 80), Box(250, 300, 50, 50)],
                          boxes) == {0: 1, 1: 0}
  assert video.pair_faces([Box(110, 110, 90, 90), Box(100, 102, 80, 80)], boxes) == {1: 0}
  assert video.pair_faces([Box(150, 150, 80, 80)], boxes) == {}
  # Images are separate scenes: no tracks.
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(2):
    cv2.imwrite(str(folder / f"{i}.png"), clip_frames[i])
  assert [[f.track for f in r.faces] for r in video.analyze_video(str(folder), predictor)] == \
      [[None], [None]]


def test_analyze_video_smooths_each_face_over_the_frames_of_a_video(predictor, clip_frames,
                                                                   tmp_path):
  import cv2

  raw = list(video.analyze_video(CLIP, predictor, max_frames=20))
  smooth = list(video.analyze_video(CLIP, predictor, max_frames=20, smooth=0.6))
  # The same faces found (the boxes do not depend on the probabilities), each an
  # exponential moving average of its own frame's probabilities.
  assert [[f.box for f in r.faces] for r in raw] == [[f.box for f in r.faces] for r in smooth]
  assert sum(len(r.faces) == 1 for r in raw) >= 18
  previous = None
  for r, s in zip(raw, smooth):
    if not r.faces:  # A frame the face was missed in: it is smoothed on after it.
      continue
    expected = r.faces[0].probs if previous is None else 0.6 * previous + 0.4 * r.faces[0].probs
    np.testing.assert_allclose(s.faces[0].probs, expected, rtol=1e-5, atol=1e-7)
    assert s.faces[0].label_index == int(np.argmax(expected))
    previous = s.faces[0].probs
  assert not np.allclose(smooth[-1].faces[0].probs, raw[-1].faces[0].probs, atol=1e-6)
  # Images are separate scenes: never averaged.
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    cv2.imwrite(str(folder / f"{i}.png"), clip_frames[i * 10])
  raw, smooth = (list(video.analyze_video(str(folder), predictor, smooth=k)) for k in (0, 0.6))
  for r, s in zip(raw, smooth, strict=True):
    np.testing.assert_array_equal(r.faces[0].probs, s.faces[0].probs)
  for bad in (1, 1.5, -0.1, "0.5", True):
    with pytest.raises(ConfigError, match="smooth must be at least 0 and below 1"):
      video.analyze_video(CLIP, predictor, smooth=bad)


def test_pipeline_writes_csv_json_and_annotated_video(predictor, tmp_path):
  import cv2

  out, table, record = tmp_path / "out.mp4", tmp_path / "faces.csv", tmp_path / "faces.json"
  summary = video.run_pipeline(CLIP, predictor, output=str(out), csv_path=str(table),
                               json_path=str(record))
  assert summary["frames"] == CLIP_FRAMES and not summary["displayed"]
  capture = cv2.VideoCapture(str(out))
  written = 0
  while capture.read()[0]:
    written += 1
  assert written == CLIP_FRAMES
  assert capture.get(cv2.CAP_PROP_FRAME_WIDTH) == 640
  capture.release()
  with open(table, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == annotate.csv_header(predictor.class_names)
  assert len(rows) == summary["faces"] >= CLIP_FRAMES - 2
  assert len({r["frame"] for r in rows}) == len(rows)  # One face per frame in this clip.
  probs = np.array([[float(r[f"p_{n}"]) for n in predictor.class_names] for r in rows])
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
  assert all(r["label"] == predictor.class_names[p.argmax()] for r, p in zip(rows, probs))
  faces = [face for r in video.analyze_video(CLIP, predictor) for face in r.faces]
  tracks = [face.track for face in faces]
  assert [int(r["track"]) for r in rows] == tracks and tracks[0] == 0
  # The summary's account of each face: its frames, labels and mean probabilities.
  assert [t["track"] for t in summary["tracks"]] == sorted(set(tracks))
  for t in summary["tracks"]:
    own = [(i, f) for i, f in enumerate(faces) if f.track == t["track"]]
    assert t["frames"] == len(own) and sum(t["labels"].values()) == len(own)
    assert t["first_frame"] == int(rows[own[0][0]]["frame"])
    assert t["last_frame"] == int(rows[own[-1][0]]["frame"])
    mean = np.mean([f.probs for _, f in own], axis=0)
    np.testing.assert_allclose(list(t["mean_probs"].values()), mean, atol=2e-6)
    counts = np.bincount([f.label_index for _, f in own], minlength=7)
    assert t["labels"] == {n: int(c) for n, c in zip(predictor.class_names, counts) if c}
    assert t["label"] == predictor.class_names[int(counts.argmax())]
  report = video.format_summary(summary)
  longest = max(summary["tracks"], key=lambda t: t["frames"])
  assert (f"face #{longest['track']}: {longest['frames']} frames (frames "
          f"{longest['first_frame']}-{longest['last_frame']}") in report
  data = json.loads(record.read_text())
  assert len(data["frames"]) == CLIP_FRAMES and data["summary"]["faces"] == summary["faces"]
  assert [f["track"] for frame in data["frames"] for f in frame["faces"]] == tracks
  assert data["summary"]["tracks"] == summary["tracks"]
  assert data["class_names"] == list(predictor.class_names)
  assert data["every"] == 1 and data["redetect_every"] == video.REDETECT_EVERY
  assert data["smooth"] == 0 and data["track_grace"] == video.TRACK_GRACE_FRAMES


def test_the_json_record_streams_its_frames_and_replaces_the_file_only_at_the_end(tmp_path):
  path = tmp_path / "faces.json"
  path.write_text("previous record")
  partial = tmp_path / ".faces.json.partial.json"
  header = {"source": "caf\u00e9 \udce9.mp4", "every": 2, "checkpoint": None}
  frames = [{"frame": i, "image": None, "faces": [{"label": "happy", "probs": [0.5, 0.25]}]}
            for i in range(5000)]
  record = annotate.ResultsJSON(str(path), header)
  for frame in frames:
    record.write(frame)
  # The frames are on disk, not held back in memory, and the old file is still in place.
  assert partial.stat().st_size > 200_000 and path.read_text() == "previous record"
  record.close(summary={"frames": 5000, "fps": 31.5})
  assert json.loads(path.read_text()) == {**header, "frames": frames,
                                          "summary": {"frames": 5000, "fps": 31.5}}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.json"]

  empty = annotate.ResultsJSON(str(path), {"source": "demo"})
  empty.close(summary={"frames": 0})
  assert json.loads(path.read_text()) == {"source": "demo", "frames": [],
                                          "summary": {"frames": 0}}
  failed = annotate.ResultsJSON(str(path), {"source": "demo"})
  failed.write({"frame": 0})
  failed.close(commit=False)
  assert json.loads(path.read_text())["frames"] == []
  assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.json"]


def test_image_folder_skips_non_images_with_a_warning(predictor, clip_frames, tmp_path,
                                                      caplog):
  import cv2

  folder = tmp_path / "images"
  folder.mkdir()
  cv2.imwrite(str(folder / "frame10.png"), clip_frames[10])
  cv2.imwrite(str(folder / "frame9.jpg"), clip_frames[9])
  (folder / "notes.txt").write_text("not an image")
  (folder / "sub").mkdir()
  with caplog.at_level(logging.WARNING, logger="ferjax"):
    results = list(video.analyze_video(str(folder), predictor))
  assert [r.name for r in results] == ["frame9.jpg", "frame10.png"]  # Natural order.
  assert all(r.time_s is None and len(r.faces) == 1 for r in results)
  assert "notes.txt: not an image file; skipped" in caplog.text
  assert f"{folder}: 1 subfolder (sub) not searched" in caplog.text
  out = tmp_path / "annotated"
  summary = video.run_pipeline(str(folder), predictor, output=str(out), every=5)
  assert sorted(os.listdir(out)) == ["frame10.png", "frame9.jpg"]
  assert summary["analyzed_frames"] == 2  # Images are always analysed.
  assert summary["skipped"] == [str(folder / "notes.txt")]


def test_single_image_source(predictor, clip_frames, tmp_path):
  import cv2

  path = tmp_path / "face.png"
  cv2.imwrite(str(path), clip_frames[0])
  results = list(video.analyze_video(str(path), predictor))
  assert len(results) == 1 and results[0].name == "face.png" and len(results[0].faces) == 1
  out = tmp_path / "annotated.jpg"
  summary = video.run_pipeline(str(path), predictor, output=str(out))
  assert summary["faces"] == 1 and cv2.imread(str(out)).shape == clip_frames[0].shape


def test_images_are_turned_upright_as_their_exif_orientation_says(tmp_path):
  import struct

  import cv2
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :10] = 255  # A white stripe down the left side.
  jpeg = cv2.imencode(".jpg", image)[1].tobytes()
  # An EXIF block with one tag, Orientation = 6: the camera was turned 90° clockwise.
  tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, 6) + \
      struct.pack("<I", 0)
  app1 = b"Exif\x00\x00" + tiff
  path = tmp_path / "phone.jpg"
  path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:])
  [(frame, _, name)] = list(sources.open_source(str(path)))
  assert name == "phone.jpg" and frame.shape == (80, 40, 3)
  assert frame[:5].mean() > 200 and frame[-5:].mean() < 50  # The stripe is now on top.
  grey16 = tmp_path / "deep.png"
  cv2.imwrite(str(grey16), (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20))
  [(frame, _, _)] = list(sources.open_source(str(grey16)))
  assert frame.dtype == np.uint8 and frame.shape == (48, 48, 3) and frame.max() == 255


def test_unopenable_sources_raise_one_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "fake.mp4").write_text("not a video")
  (tmp_path / "fake.png").write_text("not an image")
  cases = {str(tmp_path / "missing.mp4"): "no such file",
           str(tmp_path / "empty"): "no image files",
           str(tmp_path / "fake.mp4"): "cannot open this as a video",
           "97": "camera 97: cannot open"}
  (tmp_path / "sorted" / "2024").mkdir(parents=True)  # Photos in subfolders only.
  cases[str(tmp_path / "sorted")] = r"no image files in this folder \(.*\); 1 subfolder \(2024\)"
  for source, message in cases.items():
    with pytest.raises(sources.SourceError, match=message) as info:
      sources.open_source(source)
    assert isinstance(info.value, FerjaxError) and "\n" not in str(info.value)
  with pytest.raises(sources.SourceError, match="cannot decode"):
    list(sources.open_source(str(tmp_path / "fake.png")))


def test_drawing_keeps_the_frame_and_marks_it(predictor, clip_frames):
  frame = clip_frames[0].copy()
  faces = video.analyze_frame(frame, predictor, FaceDetector())
  drawn = annotate.draw_results(frame, faces, predictor.class_names, fps=30.0)
  assert drawn.shape == frame.shape and np.array_equal(frame, clip_frames[0])
  assert (drawn != frame).any()
  grey = annotate.draw_results(frame[..., 0], faces, predictor.class_names)
  assert grey.shape == frame.shape
  # A video's face shows its track number before the label: only the label's strip changes.
  numbered = annotate.draw_results(frame, [dataclasses.replace(faces[0], track=3)],
                                   predictor.class_names, fps=30.0)
  changed_rows = np.flatnonzero((numbered != drawn).any(axis=(1, 2)))
  x, y, w, h = faces[0].box
  assert changed_rows.size and changed_rows.max() < y and changed_rows.min() > y - 30


def test_bad_output_names_are_refused(predictor, tmp_path):
  with pytest.raises(FerjaxError, match="must end in"):
    video.run_pipeline(CLIP, predictor, output=str(tmp_path / "out.gif"))


def test_the_display_is_probed_once_per_display(monkeypatch):
  import cv2

  opened = []
  monkeypatch.setattr(cv2, "namedWindow", lambda name, flags: opened.append(name))
  monkeypatch.setattr(cv2, "destroyWindow", lambda name: None)
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
  annotate._probe_display.cache_clear()
  try:
    monkeypatch.setenv("DISPLAY", ":77")
    # The realtime script asks, then run_pipeline asks again: one window opened and closed.
    assert annotate.display_available() == annotate.display_available() == (True, "")
    assert len(opened) == 1
    monkeypatch.setenv("DISPLAY", ":78")
    assert annotate.display_available() == (True, "") and len(opened) == 2
    monkeypatch.delenv("DISPLAY")
    assert annotate.display_available() == (False, "DISPLAY is not set") and len(opened) == 2
  finally:
    annotate._probe_display.cache_clear()


def _script(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.realtime", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_script_fails_in_one_line_for_a_source_it_cannot_open(tmp_path):
  missing = str(tmp_path / "nope.mp4")
  result = _script(f"--source={missing}", "--no_display")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file, folder or camera"]


@pytest.mark.parametrize("flag,why", [("--smooth=1", "--smooth must be below 1"),
                                      ("--smooth=-0.2", "-0.2 is not a non-negative number"),
                                      ("--track_grace=-1", "-1 is not a non-negative integer")])
def test_script_refuses_a_smoothing_weight_outside_0_to_1_or_a_negative_grace(flag, why):
  result = _script("--source=demo", flag, "--no_display")
  assert result.returncode == 1 and why in result.stderr, result.stderr


def test_script_refuses_bad_detector_settings_in_one_line():
  result = _script("--source=demo", "--scale_factor=1", "--no_display")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == ["error: --scale_factor must be above 1, got 1.0"]


def test_script_runs_headless_on_the_clip(tiny_run, tmp_path):
  table = tmp_path / "faces.csv"
  record = tmp_path / "faces.json"
  result = _script(f"--source={CLIP}", f"--workdir={tiny_run[0]}", f"--csv={table}",
                   f"--json={record}", "--max_frames=12", "--every=2", "--max_faces=2",
                   "--redetect_every=3", "--smooth=0.7", "--track_grace=2")
  assert result.returncode == 0, result.stderr[-2000:]
  settings = json.loads(record.read_text())
  assert settings["smooth"] == 0.7 and settings["track_grace"] == 2
  assert "no display" in result.stderr and "running headless" in result.stderr
  assert "frames processed 12 (model ran on 6)" in result.stdout
  assert "(2 frames searched in full, the rest tracked)" in result.stdout
  assert "FPS" in result.stdout and "detect" in result.stdout and "predict" in result.stdout
  with open(table, newline="") as f:
    assert len(list(csv.DictReader(f))) == 6


class _FailingPredictor:
  """Wraps a predictor and fails on its third call, as a crash mid-run would."""

  def __init__(self, inner):
    self._inner = inner
    self.class_names = inner.class_names
    self.max_faces = inner.max_faces
    self.calls = 0

  def warmup(self):
    return 0.0

  def predict_faces(self, crops, **kwargs):
    self.calls += 1
    if self.calls == 3:
      raise RuntimeError("simulated failure")
    return self._inner.predict_faces(crops, **kwargs)


def test_a_failed_run_leaves_earlier_outputs_untouched(predictor, tmp_path):
  out, table = tmp_path / "out.mp4", tmp_path / "faces.csv"
  out.write_bytes(b"previous video")
  table.write_text("previous csv")
  with pytest.raises(RuntimeError, match="simulated failure"):
    video.run_pipeline(CLIP, _FailingPredictor(predictor), output=str(out), csv_path=str(table))
  assert out.read_bytes() == b"previous video" and table.read_text() == "previous csv"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.csv", "out.mp4"]  # No leftovers.
  video.run_pipeline(CLIP, predictor, output=str(out), csv_path=str(table), max_frames=5)
  assert out.stat().st_size > 1000 and table.read_text().startswith("frame,")


def _image_folder(path, frames, n=3):
  import cv2
  path.mkdir()
  for i in range(n):
    assert cv2.imwrite(str(path / f"face{i}.png"), frames[i * 10])
  return path


def test_a_failed_image_run_leaves_earlier_images_untouched(predictor, tmp_path, clip_frames):
  photos = _image_folder(tmp_path / "photos", clip_frames)
  out = tmp_path / "out"
  out.mkdir()
  (out / "face0.png").write_bytes(b"previous image")
  with pytest.raises(RuntimeError, match="simulated failure"):
    video.run_pipeline(str(photos), _FailingPredictor(predictor), output=str(out))
  assert sorted(p.name for p in out.iterdir()) == ["face0.png"]  # No partial files left.
  assert (out / "face0.png").read_bytes() == b"previous image"
  video.run_pipeline(str(photos), predictor, output=str(out))
  assert sorted(p.name for p in out.iterdir()) == ["face0.png", "face1.png", "face2.png"]
  assert (out / "face0.png").read_bytes() != b"previous image"


def test_outputs_may_not_replace_their_source(predictor, tmp_path, clip_frames):
  import shutil
  clip = tmp_path / "clip.mp4"
  shutil.copy(CLIP, clip)
  photos = _image_folder(tmp_path / "photos", clip_frames)
  before = {p.name: p.read_bytes() for p in photos.iterdir()}
  cases = [(dict(source=str(clip), output=str(clip)), "--output=.* is the source itself"),
           (dict(source=str(clip), csv_path=str(clip)), "--csv=.* is the source itself"),
           (dict(source=str(photos), output=str(photos)), "--output=.* is the source folder"),
           (dict(source=str(photos / "face1.png"), output=str(photos)), "is the source itself"),
           (dict(source=str(photos / "face1.png"), json_path=str(photos / "face1.png")),
            "--json=.* is the source itself")]
  for kwargs, message in cases:
    source = kwargs.pop("source")
    with pytest.raises(ConfigError, match=message):
      video.run_pipeline(source, predictor, **kwargs)
  assert clip.read_bytes() == open(CLIP, "rb").read()
  assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
  # A folder inside the source folder is fine: the copies get names of their own.
  video.run_pipeline(str(photos), predictor, output=str(photos / "annotated"))
  assert len(list((photos / "annotated").iterdir())) == 3


def test_script_prints_faces_headless_on_the_demo_clip(tiny_run, tmp_path):
  out = tmp_path / "demo.mp4"
  r = subprocess.run([sys.executable, "-m", "experiments.realtime", "--source=demo",
                      # --checkpoint: the earlier name of --workdir, still accepted.
                      f"--checkpoint={tiny_run[0]}", "--no_display", f"--output={out}",
                      "--max_frames=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [line for line in r.stdout.splitlines() if line.startswith("frame")]
  assert len(lines) >= 4 and " at (" in lines[0] and "FPS" in r.stdout
  assert out.stat().st_size > 1000


class _FakeCamera:
  """Stands in for ``cv2.VideoCapture(index)``: replays frames, then fails as an unplugged camera.

  No camera is attached to the test machine; this drives the camera branch of
  ``open_source`` and the pipeline with the demo clip's real frames.
  """

  def __init__(self, frames):
    self._frames = list(frames)
    self.settings = {}
    self.released = False

  def isOpened(self):  # noqa: N802 - OpenCV's name.
    return True

  def set(self, prop, value):
    self.settings[prop] = value
    return True

  def get(self, prop):
    import cv2

    return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

  def read(self):
    if not self._frames:
      return False, None
    return True, self._frames.pop(0)

  def release(self):
    self.released = True


def _patch_camera(monkeypatch, camera):
  import cv2

  real = cv2.VideoCapture
  opened = []

  def video_capture(arg, *rest):
    if isinstance(arg, int):
      opened.append(arg)
      return camera
    return real(arg, *rest)

  monkeypatch.setattr(cv2, "VideoCapture", video_capture)
  return opened


def test_a_camera_streams_its_frames_until_it_is_unplugged(monkeypatch, caplog, predictor,
                                                           clip_frames):
  import cv2

  camera = _FakeCamera(clip_frames[:7])
  opened = _patch_camera(monkeypatch, camera)
  src = sources.open_source("0")
  assert opened == [0] and src.kind == "camera" and src.description == "camera 0"
  assert src.fps == 30.0 and camera.settings == {cv2.CAP_PROP_BUFFERSIZE: 1}
  with caplog.at_level(logging.WARNING):
    got = list(src)
  # The frame read to check the camera is the first one yielded, not lost.
  assert len(got) == 7 and np.array_equal(got[0][0], clip_frames[0])
  times = [t for _, t, _ in got]
  assert all(b >= a for a, b in zip(times, times[1:])) and all(n is None for _, _, n in got)
  assert "camera 0: no more frames (camera closed or unplugged)" in caplog.text
  src.close()
  assert camera.released

  # The whole pipeline on a camera: every frame analysed, the face found, the camera released.
  camera = _FakeCamera(clip_frames[:6])
  _patch_camera(monkeypatch, camera)
  seen = []
  summary = video.run_pipeline(0, predictor, on_result=seen.append)
  assert summary["source"] == "camera 0" and summary["frames"] == 6 and camera.released
  assert [len(r.faces) for r in seen] == [1] * 6


def test_a_camera_that_opens_but_gives_no_frame_is_refused(monkeypatch):
  camera = _FakeCamera([])
  _patch_camera(monkeypatch, camera)
  with pytest.raises(sources.SourceError, match="^camera 3: opened but gives no frames$"):
    sources.open_source(3)
  assert camera.released


def test_the_window_shows_every_frame_and_q_quits(monkeypatch, predictor, clip_frames):
  import cv2

  shown, waits, destroyed = [], [], []

  def wait_key(delay):
    waits.append(delay)
    return ord("q") if len(waits) == 5 else -1  # -1: no key pressed.

  monkeypatch.setattr(video, "display_available", lambda: (True, ""))
  monkeypatch.setattr(cv2, "imshow", lambda name, image: shown.append((name, image)))
  monkeypatch.setattr(cv2, "waitKey", wait_key)
  monkeypatch.setattr(cv2, "destroyAllWindows", lambda: destroyed.append(True))
  camera = _FakeCamera(clip_frames[:20])
  _patch_camera(monkeypatch, camera)
  summary = video.run_pipeline(0, predictor, display=True, window="faces")
  assert summary["displayed"] and summary["frames"] == 5  # Stopped at the key, not at frame 20.
  assert waits == [1] * 5  # A live source polls the keyboard; it never blocks.
  assert [name for name, _ in shown] == ["faces"] * 5
  for (_, image), frame in zip(shown, clip_frames):
    assert image.shape == frame.shape and not np.array_equal(image, frame)  # Annotated.
  assert destroyed and camera.released


def test_an_image_stays_in_the_window_until_a_key(monkeypatch, predictor, clip_frames, tmp_path):
  import cv2

  for i in range(3):
    cv2.imwrite(str(tmp_path / f"face{i}.png"), clip_frames[i * 10])
  waits = []
  monkeypatch.setattr(video, "display_available", lambda: (True, ""))
  monkeypatch.setattr(cv2, "imshow", lambda name, image: None)
  monkeypatch.setattr(cv2, "waitKey", lambda delay: waits.append(delay) or 32)  # Space: next.
  monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)
  summary = video.run_pipeline(str(tmp_path), predictor, display=True)
  assert summary["frames"] == 3 and waits == [0, 0, 0]


def test_the_script_refuses_outputs_over_its_source_before_the_model_loads(tmp_path, clip_frames):
  import shutil
  clip = tmp_path / "clip.mkv"
  shutil.copy(CLIP, clip)
  photos = _image_folder(tmp_path / "photos", clip_frames, n=2)
  before = {p.name: p.read_bytes() for p in photos.iterdir()}
  # --workdir names no checkpoint: reaching the model would fail with another message.
  missing = str(tmp_path / "no-run")
  for args, message in [
      ((f"--source={clip}", f"--output={clip}"), f"--output={clip} is the source itself"),
      ((f"--source={clip}", f"--csv={clip}"), f"--csv={clip} is the source itself"),
      ((f"--source={photos}", f"--output={photos}"), f"--output={photos} is the source folder"),
      (("--source=demo", f"--json={sources.DEMO_CLIP}"), "is the source itself"),
      (("--source=demo", f"--csv={tmp_path}"), f"--csv={tmp_path} is a folder; give a file name"),
      ((f"--source={clip}", f"--output={photos}"), f"--output={photos} is a folder")]:
    result = _script(*args, f"--workdir={missing}", "--no_display")
    assert result.returncode == 2, (args, result.stderr[-1000:])
    assert message in result.stderr.strip().splitlines()[-1], (args, result.stderr[-1000:])
  assert clip.read_bytes() == open(CLIP, "rb").read()
  assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_an_opened_source_is_checked_like_a_path(predictor, tmp_path):
  import shutil
  clip = tmp_path / "clip.mkv"
  shutil.copy(CLIP, clip)
  with sources.open_source(str(clip)) as src:
    with pytest.raises(ConfigError, match="is the source itself"):
      video.run_pipeline(src, predictor, output=str(clip))
  with pytest.raises(ConfigError, match="is the source itself"):
    video.check_outputs("demo", output=sources.DEMO_CLIP)
  assert clip.read_bytes() == open(CLIP, "rb").read()


def test_an_interrupted_video_run_keeps_earlier_outputs(predictor, tmp_path):
  out, table = tmp_path / "out.mp4", tmp_path / "faces.csv"
  out.write_bytes(b"previous video")
  table.write_text("previous csv")

  def interrupt(result):
    if result.index == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    video.run_pipeline(CLIP, predictor, output=str(out), csv_path=str(table), on_result=interrupt)
  assert out.read_bytes() == b"previous video" and table.read_text() == "previous csv"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.csv", "out.mp4"]


def test_an_interrupted_camera_run_ends_normally_and_keeps_its_outputs(monkeypatch, predictor,
                                                                       clip_frames, tmp_path):
  _patch_camera(monkeypatch, _FakeCamera(clip_frames[:10]))
  table = tmp_path / "faces.csv"

  def interrupt(result):
    if result.index == 3:
      raise KeyboardInterrupt  # Ctrl-C: how a headless camera run is stopped.

  record = tmp_path / "faces.json"
  summary = video.run_pipeline(0, predictor, csv_path=str(table), json_path=str(record),
                               on_result=interrupt)
  assert summary["frames"] == 4 and summary["files"] == [str(table), str(record)]
  with open(table, newline="") as f:
    # Frame 3 was interrupted before its row was written.
    assert [row["frame"] for row in csv.DictReader(f)] == ["0", "1", "2"]
  data = json.loads(record.read_text())
  assert [frame["frame"] for frame in data["frames"]] == [0, 1, 2]
  assert data["summary"]["frames"] == 4 and data["source"] == "camera 0"


def test_pgm_images_get_grey_annotated_copies(predictor, tmp_path, clip_frames):
  import cv2
  folder = tmp_path / "pgm"
  folder.mkdir()
  for i in range(2):
    assert cv2.imwrite(str(folder / f"face{i}.pgm"), cv2.cvtColor(clip_frames[i * 10],
                                                                  cv2.COLOR_BGR2GRAY))
  out = tmp_path / "out"
  summary = video.run_pipeline(str(folder), predictor, output=str(out))
  assert summary["faces"] == 2 and summary["files"] == [str(out)]
  copy = cv2.imread(str(out / "face0.pgm"), cv2.IMREAD_UNCHANGED)
  original = cv2.imread(str(folder / "face0.pgm"), cv2.IMREAD_UNCHANGED)
  assert copy.shape == original.shape and not np.array_equal(copy, original)  # Marked.


def test_a_folder_with_no_decodable_image_is_an_error(predictor, tmp_path):
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "a.png").write_bytes(b"not a png")
  (folder / "b.jpg").write_bytes(b"not a jpeg")
  out = tmp_path / "out"
  with pytest.raises(sources.SourceError, match="none of its 2 image files could be decoded"):
    video.run_pipeline(str(folder), predictor, output=str(out), csv_path=str(tmp_path / "f.csv"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # Nothing written.


def test_a_broken_single_image_fails_when_opened(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(sources.SourceError, match="bad.png: cannot decode this image"):
    sources.open_source(str(bad))


def test_a_csv_that_cannot_be_moved_into_place_leaves_nothing_behind(predictor, tmp_path,
                                                                     monkeypatch):
  real_replace = os.replace

  def replace(src, dst):
    if str(dst).endswith(".csv"):
      raise IsADirectoryError(21, "Is a directory")
    return real_replace(src, dst)

  monkeypatch.setattr(annotate.os, "replace", replace)
  out, table = tmp_path / "out.mp4", tmp_path / "faces.csv"
  with pytest.raises(annotate.OutputError, match="faces.csv: cannot write"):
    video.run_pipeline(CLIP, predictor, output=str(out), csv_path=str(table), max_frames=3)
  # The video, closed before the table, is in place; no partial file is left.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_tracking_survives_a_frame_that_shrank(predictor, clip_frames):
  import cv2
  detector = FaceDetector()
  faces = video.analyze_frame(clip_frames[0], predictor, detector)
  assert faces and faces[0].box.x > 200  # The demo face lies right of a 160-px frame.
  small = cv2.resize(clip_frames[0], (160, 120))
  assert video.analyze_frame(small, predictor, detector, near=[f.box for f in faces]) == []


def test_analyze_video_compiles_every_batch_size_before_the_first_frame(tiny_run):
  fresh = Predictor(tiny_run[0], max_faces=4)
  frames = video.analyze_video(CLIP, fresh, max_frames=2)
  assert fresh.compile_seconds is not None and fresh.trace_count == 3  # Sizes 1, 2 and 4.
  assert len(list(frames)) == 2 and fresh.trace_count == 3


def test_file_names_that_are_not_utf8_are_read_and_written(tiny_run, tmp_path, clip_frames):
  """A Latin-1 name (Python holds its odd bytes as lone surrogates) crashed OpenCV: segfault."""
  import cv2
  name = os.fsdecode(b"caf\xe9")
  folder = tmp_path / "photos"
  folder.mkdir()
  try:
    (folder / f"{name}.png").write_bytes(cv2.imencode(".png", clip_frames[0])[1].tobytes())
  except (OSError, UnicodeEncodeError):
    pytest.skip("this file system takes UTF-8 names only")
  table, out = tmp_path / "faces.csv", tmp_path / "annotated"
  result = _script(f"--source={folder}", f"--workdir={tiny_run[0]}", f"--output={out}",
                   f"--csv={table}", "--print_faces", "--no_display")
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(out) == [f"{name}.png"]
  assert "caf\\udce9.png: " in result.stdout  # Escaped, as on stderr.
  with open(table, newline="") as f:
    assert [row["image"] for row in csv.DictReader(f)] == ["caf\\udce9.png"]
  # A video read and written under such names (no model needed: OpenCV crashed in open).
  clip = tmp_path / f"{name}.mkv"
  clip.write_bytes(open(CLIP, "rb").read())
  code = ("import sys; from ferjax import annotate, sources\n"
          "with sources.open_source(sys.argv[1]) as src: frame = next(iter(src))[0]\n"
          "w = annotate.AnnotatedVideoWriter(sys.argv[2], 30.0); w.write(frame); w.close()\n")
  copy = tmp_path / f"{name}-out.mp4"
  result = subprocess.run([sys.executable, "-c", code, str(clip), str(copy)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert copy.stat().st_size > 0


def test_outputs_that_cannot_be_written_fail_before_the_first_frame(predictor, tmp_path):
  out = tmp_path / "out.mp4"
  out.write_bytes(b"previous video")
  (tmp_path / "notes.txt").write_text("a file, not a folder")
  # Checked before the first frame (the JSON used to be written after the video was in place).
  with pytest.raises(annotate.OutputError, match="notes.txt is not a folder"):
    video.run_pipeline(CLIP, predictor, output=str(out),
                       json_path=str(tmp_path / "notes.txt" / "faces.json"))
  assert out.read_bytes() == b"previous video"
  # Two outputs in one file: both wrote the same partial file, a mix of video and CSV.
  with pytest.raises(ConfigError, match="is also --output"):
    video.run_pipeline(CLIP, predictor, output=str(out), csv_path=str(out), max_frames=2)
  assert out.read_bytes() == b"previous video"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.mp4"]
  # A stream given by URL writes a video: an existing file of that name is one to replace at
  # the end, not a folder of annotated images that turned out to be a file.
  video.check_outputs("rtsp://camera.local/stream", output=str(out))


def test_the_script_refuses_output_names_that_cannot_work_before_the_model_loads(tmp_path):
  (tmp_path / "notes.txt").write_text("a file, not a folder")
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "a.png").write_bytes(b"not decoded before the model loads")
  # --workdir names no checkpoint: reaching the model would fail with another message.
  missing = str(tmp_path / "no-run")
  for args, message in [
      (("--source=demo", f"--output={tmp_path / 'out.mov'}"), "annotated video must end in"),
      ((f"--source={photos}", f"--output={tmp_path / 'out.mp4'}"), "not a video"),
      ((f"--source={photos}", f"--output={tmp_path / 'notes.txt'}"), "notes.txt is a file"),
      (("--source=demo", f"--csv={tmp_path / 'notes.txt' / 'f.csv'}"), "is not a folder")]:
    result = _script(*args, f"--workdir={missing}", "--no_display")
    assert result.returncode == 2, (args, result.stderr[-1000:])
    assert result.stderr.strip().splitlines()[-1].startswith("error: --"), result.stderr[-1000:]
    assert message in result.stderr.strip().splitlines()[-1], (args, result.stderr[-1000:])


def test_a_cut_off_video_is_read_to_its_end_with_a_warning(tmp_path, caplog):
  data = open(CLIP, "rb").read()
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(data[:len(data) // 2])  # A download that stopped halfway.
  with caplog.at_level(logging.WARNING, logger="ferjax"):
    with sources.open_source(str(cut)) as src:
      frames = sum(1 for _ in src)
    assert 0 < frames < CLIP_FRAMES - 10
    assert f"cut.mkv: the video ended after {frames} of the {src.frame_count} frames" in caplog.text
    caplog.clear()
    with sources.open_source(CLIP) as src:  # Whole (its header says 66 for its 65 frames).
      assert sum(1 for _ in src) == CLIP_FRAMES
    assert "ended after" not in caplog.text


def test_the_script_names_an_unreadable_video_in_one_line(tmp_path):
  head = tmp_path / "head.mkv"
  head.write_bytes(open(CLIP, "rb").read()[:300])  # Its header, cut off: FFmpeg complained.
  result = _script(f"--source={head}", "--no_display")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {head}: OpenCV cannot open this as a video or image"]


def test_a_text_file_is_not_played_as_a_video(tmp_path):
  # FFmpeg's tty demuxer opens a long enough .txt file as a video of rendered characters
  # (OpenCV gave a licence text 78 frames, which ran to the end with exit status 0).
  notes = tmp_path / "LICENSE.txt"
  notes.write_text("Attribution 4.0 International\n\n" + "Some licence text, line after line.\n"
                   * 600)
  result = _script(f"--source={notes}", "--no_display")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {notes}: a text file, not a video or image (FFmpeg would play its characters "
      "as ANSI art)"]


def test_the_summary_says_tracked_only_when_frames_were_tracked():
  summary = {"frames": 1, "analyzed_frames": 1, "faces": 1, "full_detections": 1, "fps": 2.0,
             "seconds": 0.5, "ms_per_call": {}, "calls": {}}
  assert "faces found 1 (every frame searched in full), " in video.format_summary(summary)
  summary.update(frames=7, analyzed_frames=7, full_detections=1)
  assert "(1 frame searched in full, the rest tracked)" in video.format_summary(summary)
  summary.update(full_detections=2)
  assert "(2 frames searched in full, the rest tracked)" in video.format_summary(summary)
  # A line per face, the ones seen longest first, ten at most; none without tracks (images).
  tally = video.TrackTally(("a", "b"))
  for index in range(13):
    faces = [_face((10 * k, 0, 8, 8), [0.25, 0.75] if k % 2 else [0.9, 0.1], names=("a", "b"))
             for k in range(min(index + 1, 12))]
    tally.add(video.FrameResult(index, index / 10, None, None,
                                [dataclasses.replace(f, track=k) for k, f in enumerate(faces)]))
  summary["tracks"] = tally.summary()
  assert summary["tracks"][1] == {
      "track": 1, "frames": 12, "first_frame": 1, "last_frame": 12, "first_time_s": 0.1,
      "last_time_s": 1.2, "label": "b", "labels": {"b": 12}, "mean_probs": {"a": 0.25, "b": 0.75}}
  lines = video.format_summary(summary).splitlines()
  faces = [line for line in lines if line.startswith("face #")]
  assert len(faces) == 10 and faces[0] == ("face #0: 13 frames (frames 0-12, 0.00-1.20 s), "
                                           "mostly a (13 of 13)")
  assert faces[-1].startswith("face #9: 4 frames")
  assert "... and 2 more faces (seen for fewer frames) in the JSON summary" in lines
  summary["tracks"] = [dict(summary["tracks"][0], frames=1, last_frame=0, last_time_s=0.0,
                            labels={"a": 1})]
  assert "face #0: 1 frame (frame 0, 0.00 s), mostly a (1 of 1)" in video.format_summary(summary)
  summary["tracks"] = []
  assert not any(line.startswith("face #") for line in video.format_summary(summary).splitlines())


def test_ctrl_c_while_a_file_is_written_leaves_no_partial_file(monkeypatch, predictor,
                                                                tmp_path, clip_frames):
  import cv2
  photos = _image_folder(tmp_path / "photos", clip_frames, n=2)
  out = tmp_path / "annotated"
  out.mkdir()
  (out / "face0.png").write_bytes(b"previous image")
  real_imwrite, real_writer = cv2.imwrite, cv2.VideoWriter

  def imwrite(*args):  # SIGINT arrives while OpenCV writes; Python raises once it returns.
    real_imwrite(*args)
    raise KeyboardInterrupt

  monkeypatch.setattr(cv2, "imwrite", imwrite)
  with pytest.raises(KeyboardInterrupt):
    video.run_pipeline(str(photos), predictor, output=str(out))
  assert os.listdir(out) == ["face0.png"] and (out / "face0.png").read_bytes() == b"previous image"

  def writer(*args):
    real_writer(*args)
    raise KeyboardInterrupt

  monkeypatch.setattr(cv2, "VideoWriter", writer)
  with pytest.raises(KeyboardInterrupt):
    video.run_pipeline(CLIP, predictor, output=str(tmp_path / "out.mp4"))
  record = annotate.ResultsJSON(str(tmp_path / "faces.json"), {"source": "demo"})
  record.write({"frame": 0, "faces": []})
  real_dumps = json.dumps

  def dumps(data, **kwargs):  # SIGINT while the summary is written.
    text = real_dumps(data, **kwargs)
    if "fps" in data:
      raise KeyboardInterrupt
    return text

  monkeypatch.setattr(annotate.json, "dumps", dumps)
  with pytest.raises(KeyboardInterrupt):
    record.close(summary={"fps": 30.0})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated", "photos"]


def test_float_images_with_nan_or_infinite_pixels_are_read(tmp_path):
  """int(NaN) in the scaling to uint8 crashed the whole run, a folder of images included;
  a grey float TIFF could not be decoded at all."""
  import cv2
  for bad, shape in [(np.nan, (40, 40)), (np.inf, (40, 40)), (np.nan, (40, 40, 3))]:
    image = np.full(shape, 0.5, np.float32)
    image[0, 0] = bad
    path = tmp_path / "scan.tif"
    assert cv2.imwrite(str(path), image)
    frame = sources.read_image(str(path))
    assert frame.dtype == np.uint8 and frame.shape == (40, 40, 3)
    assert frame[0, 0].max() == 0 and frame[20, 20].min() == 128  # 0.5 of the 0..1 range.


def test_a_file_output_ending_in_a_slash_is_refused_before_the_run(predictor, tmp_path):
  """--csv=results/ (a folder not made yet) failed only after the run, 'No such file'."""
  for flag in ("csv", "json", "output"):
    name = str(tmp_path / "results") + os.sep
    with pytest.raises(ConfigError, match=f"--{flag}=.*results/ names a folder"):
      video.check_outputs(CLIP, **{flag: name})
  assert os.listdir(tmp_path) == []


def test_a_frame_of_another_size_is_searched_in_full(monkeypatch, predictor, clip_frames):
  """Tracking looked for the face where it was in the last frame's pixels: a stream that
  changed resolution lost its face until the next full search."""
  import cv2
  large = cv2.resize(clip_frames[0], (960, 720))
  _patch_camera(monkeypatch, _FakeCamera([large, clip_frames[1], clip_frames[2]]))
  stats = video.PipelineStats()
  results = list(video.analyze_video(0, predictor, redetect_every=5, stats=stats))
  assert [len(r.faces) for r in results] == [1, 1, 1]
  assert stats.full_detections == 2  # The first frame and the smaller one; the third tracked.


def test_empty_camera_frames_are_skipped_by_the_annotated_output(monkeypatch, predictor,
                                                                 clip_frames, tmp_path):
  """analyze_frame takes the empty frames some cameras hand out while starting; drawing them
  for --output (or the window) crashed the run and discarded its outputs."""
  import cv2
  empty = np.zeros((0, 0, 3), np.uint8)
  _patch_camera(monkeypatch, _FakeCamera([clip_frames[0], None, empty, clip_frames[1]]))
  out = tmp_path / "camera.mp4"
  summary = video.run_pipeline(0, predictor, output=str(out))
  assert summary["frames"] == 4 and summary["faces"] == 2 and summary["files"] == [str(out)]
  assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == 2
