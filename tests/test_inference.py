"""Predictor and face detection: the same crop and preprocess as training, one compile."""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import fer_rows, write_csv
from ferjax import checkpoint as checkpoint_lib
from ferjax import data as data_lib
from ferjax import faces as faces_lib
from ferjax import inference
from ferjax import preprocess as preprocess_lib
from ferjax import sources
from ferjax import train as train_lib
from ferjax.config import TrainConfig
from ferjax.errors import CheckpointError, ConfigError
from ferjax.faces import Box, FaceDetector, crop_face, expand_box, to_gray
from ferjax.inference import Predictor

# The tests here share a trained run (a module fixture): one pytest-xdist worker runs
# them all, so it is trained once.
pytestmark = pytest.mark.xdist_group("test_inference")

CLIP = sources.DEMO_CLIP
TINY_MODEL = dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8)


def read_clip(every: int = 1) -> list[np.ndarray]:
  """The test clip's BGR frames (640x480)."""
  import cv2

  capture = cv2.VideoCapture(CLIP)
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(frame)
  capture.release()
  return frames[::every]


_TINY_RUN: dict[str, tuple[str, str]] = {}


def train_tiny_run(tmp_path_factory) -> tuple[str, str]:
  """A tiny acnn_alstm trained by train_and_evaluate: ``(workdir, csv)``, made once per session.

  Cached here rather than by fixture scope: test_realtime imports this module, and a fixture
  imported into a second module would be a second fixture (and a second training run).
  """
  if "run" not in _TINY_RUN:
    root = tmp_path_factory.mktemp("tiny_run")
    rows = fer_rows(32, usages=("Training",)) + fer_rows(16, usages=("PublicTest",)) + \
        fer_rows(16, usages=("PrivateTest",))
    csv_path = write_csv(root / "fer2013.csv", rows)
    config = TrainConfig(model="acnn_alstm", model_overrides=TINY_MODEL, epochs=1, batch_size=16,
                         eval_batch_size=16)
    workdir = str(root / "run")
    train_lib.train_and_evaluate(config, workdir, data_path=csv_path)
    _TINY_RUN["run"] = (workdir, csv_path)
  return _TINY_RUN["run"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  return train_tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def clip_frames():
  return read_clip()


def test_detector_finds_the_face_in_the_clip(clip_frames):
  detector = FaceDetector()
  found = [detector.detect(to_gray(f)) for f in clip_frames[::3]]
  assert sum(1 for boxes in found if boxes) == len(found)  # 22/22, as measured on the clip.
  x, y, w, h = found[0][0]
  assert 60 <= w <= 120 and w == h  # Mapped back to full-frame pixels (~80 px face).
  assert 0 <= x and x + w <= 640 and 0 <= y and y + h <= 480


def test_downscaled_detection_agrees_with_full_size(clip_frames):
  full, half = FaceDetector(downscale=1.0), FaceDetector(downscale=2.0)
  gray = to_gray(clip_frames[0])
  a, b = full.detect(gray)[0], half.detect(gray)[0]
  centre = lambda box: np.array([box.x + box.w / 2, box.y + box.h / 2])  # noqa: E731
  assert np.abs(centre(a) - centre(b)).max() < 0.15 * a.w
  assert 0.8 < b.w / a.w < 1.25


def test_faces_are_sorted_largest_first_and_capped(clip_frames):
  import cv2

  face = clip_frames[0]
  small = cv2.resize(face, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
  canvas = np.full((480, 640 + small.shape[1], 3), 128, np.uint8)
  canvas[:small.shape[0], :small.shape[1]] = small
  canvas[:, small.shape[1]:] = face
  boxes = FaceDetector().detect(to_gray(canvas))
  assert len(boxes) == 2 and boxes[0].area > boxes[1].area
  assert boxes[0].x > small.shape[1]  # The full-size face is the bigger one.
  assert len(FaceDetector(max_faces=1).detect(to_gray(canvas))) == 1


def test_iou():
  assert faces_lib.iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == 1.0
  assert faces_lib.iou(Box(0, 0, 10, 10), Box(5, 0, 10, 10)) == pytest.approx(50 / 150)
  assert faces_lib.iou(Box(0, 0, 10, 10), Box(10, 0, 10, 10)) == 0.0  # Touching edges.


def test_tracking_finds_the_same_face_as_a_full_search(clip_frames):
  detector = FaceDetector()
  grays = [to_gray(f) for f in clip_frames[::4]]
  previous = detector.detect(grays[0])
  for gray in grays[1:]:
    full, tracked = detector.detect(gray), detector.detect_near(gray, previous)
    assert len(full) == len(tracked) == 1
    assert faces_lib.iou(full[0], tracked[0]) > 0.7
    previous = tracked


def test_tracking_finds_no_new_face_and_drops_a_lost_one(clip_frames):
  import cv2

  detector = FaceDetector()
  gray = to_gray(clip_frames[0])
  face = detector.detect(gray)[0]
  # Two faces side by side; tracking only the left one does not report the right one.
  pair = np.concatenate([gray, gray], axis=1)
  assert len(detector.detect(pair)) == 2
  assert detector.detect_near(pair, [face]) == detector.detect_near(gray, [face])
  assert detector.detect_near(gray, [tuple(face)]) == detector.detect_near(gray, [face])
  assert detector.detect_near(gray, np.array([face])) == detector.detect_near(gray, [face])
  # A box where no face is (the clip's face is in the centre) finds nothing.
  assert detector.detect_near(gray, [Box(0, 0, face.w, face.h)]) == []
  # Nor does a face that has shrunk below track_scale of its box.
  small = cv2.resize(gray, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
  canvas = np.full_like(gray, 127)
  canvas[:small.shape[0], :small.shape[1]] = small
  assert len(detector.detect(canvas)) == 1  # Still big enough for a full search.
  moved = Box(int(face.x * 0.6), int(face.y * 0.6), face.w, face.h)
  assert detector.detect_near(canvas, [moved]) == []
  assert len(FaceDetector(track_scale=2.5).detect_near(canvas, [moved])) == 1
  # Two tracks on one face keep one box.
  assert len(detector.detect_near(gray, [face, face])) == 1


def test_bad_tracking_settings_are_refused():
  with pytest.raises(ValueError, match="track_margin"):
    FaceDetector(track_margin=-0.1)
  with pytest.raises(ValueError, match="track_scale"):
    FaceDetector(track_scale=0.9)


def test_predictor_takes_one_face_with_its_channel_axis_and_names_bad_crops():
  from ferjax.models import create_model

  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_MODEL)
  predictor = Predictor.from_model(model, [str(i) for i in range(7)], max_faces=2)
  faces_Nx48x48x1 = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 1), dtype=np.uint8)
  # Before: FerData.images[i], one (48, 48, 1) face, was refused though (48, 48) was taken.
  np.testing.assert_allclose(predictor.predict_faces(faces_Nx48x48x1[1]),
                             predictor.predict_faces(faces_Nx48x48x1)[1:], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"got shape \(48, 48, 3\); convert colour crops to "
                                       r"grey with ferjax.faces.to_gray"):
    predictor.predict_faces(np.zeros((48, 48, 3), np.uint8))
  # Before: numpy's "inhomogeneous shape" error.
  with pytest.raises(ValueError, match=r"a list with shapes \(40, 40\), \(48, 48\)"):
    predictor.predict_faces([np.zeros((48, 48), np.uint8), np.zeros((40, 40), np.uint8)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_faces=2.5), "max_faces must be a whole number of at least 1, got 2.5"),
    (dict(min_neighbors=2.5), "min_neighbors must be a whole number of at least 0, got 2.5"),
    (dict(min_neighbors=-1), "min_neighbors must be a whole number of at least 0, got -1"),
])
def test_detector_counts_must_be_whole_numbers(kwargs, message):
  # Before: max_faces=2.5 and min_neighbors=2.5 failed at the first detect() (a slice
  # TypeError, an OpenCV overload error); min_neighbors=-1 returned every raw hit.
  with pytest.raises(ConfigError, match=message):
    FaceDetector(**kwargs)
  assert FaceDetector(max_faces=np.int64(2), min_neighbors=0).max_faces == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(every=1.5), "every must be a whole number of at least 1, got 1.5"),
    (dict(redetect_every=2.0), "redetect_every must be a whole number of at least 1, got 2.0"),
    (dict(max_frames=2.5), (r"max_frames must be a whole number of at least 1 \(None: no "
                            r"limit\), got 2.5")),
    # Before: -1 (elsewhere "no limit") gave no frames, without a word.
    (dict(max_frames=-1), (r"max_frames must be a whole number of at least 1 \(None: no "
                           r"limit\), got -1")),
])
def test_analyze_video_counts_must_be_whole_numbers(kwargs, message):
  # Before: every=1.5 analysed every third frame (index % 1.5 == 0) without a word.
  from ferjax.video import analyze_video
  with pytest.raises(ConfigError, match=message):
    analyze_video(CLIP, None, FaceDetector(), **kwargs)


def test_analyze_names_a_predictor_detector_or_source_that_is_not_one(tmp_path):
  from ferjax.models import create_model
  from ferjax.video import analyze_frame, analyze_video, run_pipeline
  frame = np.zeros((480, 640, 3), np.uint8)
  # Before: AttributeError: 'str' object has no attribute 'max_faces' (or 'predict_faces',
  # and only once a frame had a face).
  with pytest.raises(ConfigError, match="predictor must be a ferjax.inference.Predictor, e.g. "
                                        "Predictor\\(\\) for the shipped weights, got str; load a "
                                        "checkpoint with Predictor\\(path\\)$"):
    analyze_video(CLIP, "ferjax/weights/default")
  with pytest.raises(ConfigError, match="predictor must be .*got FaceDetector$"):
    analyze_frame(frame, FaceDetector(), FaceDetector())  # Predictor and detector swapped.
  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_MODEL)
  predictor = Predictor.from_model(model, [str(i) for i in range(7)])
  # Before: TypeError: FaceDetector.detect() missing 1 required positional argument: 'gray'.
  with pytest.raises(ConfigError, match="detector must be a ferjax.faces.FaceDetector, e.g. "
                                        "FaceDetector\\(\\), or None for the default, got <class"):
    analyze_frame(frame, predictor, FaceDetector)
  table = tmp_path / "faces.csv"
  with pytest.raises(ConfigError, match="predictor must be"):
    run_pipeline(CLIP, None, csv_path=str(table))
  assert not table.exists()
  # Before: TypeError: expected str, bytes or os.PathLike object, not ndarray.
  with pytest.raises(sources.SourceError, match="source must be a camera index, a video or image "
                     "file, a folder of images, a URL or 'demo', got ndarray; for one frame "
                     "already in memory use ferjax.video.analyze_frame$"):
    analyze_video(frame, predictor)
  with pytest.raises(sources.SourceError, match="got NoneType$"):
    analyze_video(None, predictor)


def test_no_face_gives_no_boxes():
  assert FaceDetector().detect(np.full((480, 640), 127, np.uint8)) == []


def test_crop_is_48x48_uint8_and_clipped_at_the_frame_edge():
  gray = np.arange(100 * 120, dtype=np.int64).reshape(100, 120).astype(np.uint8)
  crop = crop_face(gray, Box(100, 80, 40, 40), margin=0.25)
  assert crop.shape == (48, 48) and crop.dtype == np.uint8
  assert expand_box(Box(100, 80, 40, 40), 0.25, (100, 120)) == Box(90, 70, 30, 30)
  assert expand_box(Box(10, 10, 20, 20), 0.1, (100, 120)) == Box(8, 8, 24, 24)
  # A margin of the width left and right, of the height above and below.
  assert expand_box(Box(20, 10, 40, 20), 0.25, (100, 120)) == Box(10, 5, 60, 30)
  # The crop's content is the clipped grown box, all of it and nothing else.
  marked = np.zeros((100, 120), np.uint8)
  marked[70:, 90:] = 200
  assert (crop_face(marked, Box(100, 80, 40, 40), margin=0.25) == 200).all()
  # A grown box of 96x96 shrinks by exactly 2: each crop pixel averages a 2x2 block of it.
  gray = np.random.default_rng(0).integers(0, 256, (200, 240), dtype=np.uint8)
  crop = crop_face(gray, Box(60, 40, 80, 80), margin=0.1)  # Grown to (52, 32, 96, 96).
  blocks = gray[32:128, 52:148].astype(np.float64).reshape(48, 2, 48, 2).mean(axis=(1, 3))
  assert np.abs(crop - blocks).max() <= 0.5


def test_to_gray_accepts_opencv_layouts_and_refuses_others():
  bgr = np.zeros((4, 5, 3), np.uint8)
  assert to_gray(bgr).shape == (4, 5)
  assert to_gray(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5)
  assert to_gray(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5)
  with pytest.raises(ValueError, match="uint8"):
    to_gray(np.zeros((4, 5, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    to_gray(np.zeros((4, 5, 2), np.uint8))


def test_detector_names_a_float_or_missing_frame_and_takes_bgr(clip_frames):
  detector = FaceDetector()
  bgr = clip_frames[0]
  gray = to_gray(bgr)
  boxes = detector.detect(gray)
  # Before: an OpenCV assertion "_image.depth() == CV_8U in function 'detectMultiScale'".
  for call in (detector.detect, lambda f: detector.detect_near(f, boxes),
               lambda f: detector.crops(f, boxes)):
    with pytest.raises(ValueError, match="frames must be uint8 .*got float64"):
      call(gray / 255.0)
    # Before: AttributeError: 'NoneType' object has no attribute 'shape' (a failed imread).
    with pytest.raises(ValueError, match=r"no frame \(None\): cv2.imread and VideoCapture.read"):
      call(None)
  # A BGR frame is made grey (before, crops failed on it with a numpy broadcast error).
  assert detector.detect(bgr) == boxes and detector.detect_near(bgr, boxes) == \
      detector.detect_near(gray, boxes)
  np.testing.assert_array_equal(detector.crops(bgr, boxes), detector.crops(gray, boxes))


@pytest.mark.parametrize("min_size", [-5, "48", None])
def test_detector_refuses_a_min_size_that_is_not_a_size(min_size):
  # Before: accepted; "48" failed at the first detect() as a TypeError.
  with pytest.raises(ConfigError, match=f"min_size must be a number of pixels, at least 0, got "
                                        f"{re.escape(repr(min_size))}"):
    FaceDetector(min_size=min_size)


def test_a_missing_cascade_is_a_clear_error(tmp_path):
  with pytest.raises(faces_lib.DetectorError, match="not found"):
    FaceDetector(cascade_path=str(tmp_path / "nope.xml"))
  bad = tmp_path / "bad.xml"
  bad.write_text("<opencv_storage></opencv_storage>")
  with pytest.raises(faces_lib.DetectorError, match="could not load"):
    FaceDetector(cascade_path=str(bad))


def test_predictor_equals_model_on_preprocessed_crop(tiny_run, clip_frames):
  """Train/serve skew check: crop → preprocess → model is exactly the training path."""
  workdir, _ = tiny_run
  predictor = Predictor(workdir)
  model, meta = checkpoint_lib.load_model(workdir, "best")
  assert inference.preprocess is preprocess_lib.preprocess  # The one shared transform.
  assert predictor.class_names == tuple(meta["class_names"]) and predictor.num_classes == 7
  detector = FaceDetector()
  gray = to_gray(clip_frames[0])
  crops = detector.crops(gray, detector.detect(gray))
  assert crops.shape == (1, 48, 48) and crops.dtype == np.uint8
  # model(preprocess(crop)) as evaluation computes it (jitted only because eager is slow).
  expected = nnx.jit(lambda m, x: jax.nn.softmax(m(preprocess_lib.preprocess(x)), axis=-1))(
      model, crops[..., None])
  probs = predictor.predict_faces(crops)
  np.testing.assert_allclose(probs, np.asarray(expected), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(predictor.predict_faces(crops[0]), probs, rtol=1e-6)  # One face.
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_predictor_compiles_the_weights_in_and_keeps_its_own_copy(tiny_run):
  """The faces are the compiled function's only argument (the speed-up), and later changes
  to the model do not leak into the predictor built from it."""
  model, meta = checkpoint_lib.load_model(tiny_run[0], "best")
  predictor = Predictor.from_model(model, meta["class_names"], max_faces=2)
  faces = np.random.default_rng(2).integers(0, 256, (2, 48, 48), dtype=np.uint8)
  before = predictor.predict_faces(faces)
  lowered = predictor._predict.lower(np.zeros((2, 48, 48, 1), np.uint8))
  main = next(line for line in lowered.as_text().splitlines() if "func public @main" in line)
  assert main.count("%arg") == 1, main  # No weight arrives as an argument.
  assert "tensor<3x3x1x4xf32>" in lowered.as_text()  # The first convolution's kernel, inline.
  model.classifier.bias[...] = model.classifier.bias[...].at[0].add(3.0)  # Changed after.
  np.testing.assert_array_equal(predictor.predict_faces(faces), before)
  assert not np.allclose(Predictor.from_model(model, meta["class_names"]).predict_faces(faces),
                         before)


def test_one_compile_per_batch_size_whatever_the_number_of_faces(tiny_run):
  predictor = Predictor(tiny_run[0], max_faces=4)
  assert predictor.batch_sizes == (1, 2, 4)
  predictor.warmup()
  assert predictor.trace_count == 3
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 256, (11, 48, 48), dtype=np.uint8)
  singles = np.concatenate([predictor.predict_faces(f) for f in faces])
  for n in (1, 3, 4, 0, 2, 5, 11):  # 5 and 11 run as 2 and 3 calls of compiled shapes.
    probs = predictor.predict_faces(faces[:n])
    assert probs.shape == (n, 7)
    np.testing.assert_allclose(probs, singles[:n], rtol=1e-5, atol=1e-6)
  probs, weights = predictor.predict_faces(faces[:0], attention=True)
  assert probs.shape == (0, 7) and weights["alpha"].shape == (0, 36)
  predictor.predict_faces(faces[:3], attention=True)  # The same compiled functions.
  assert predictor.trace_count == 3


def test_a_single_batch_shape_compiles_once(tiny_run):
  predictor = Predictor(tiny_run[0], max_faces=4, batch_sizes=(4,))
  assert predictor.batch_sizes == (4,)
  for n in (1, 3, 4, 6):
    assert predictor.predict_faces(np.zeros((n, 48, 48), np.uint8)).shape == (n, 7)
  assert predictor.trace_count == 1
  with pytest.raises(ValueError, match="batch_sizes"):
    Predictor(tiny_run[0], max_faces=4, batch_sizes=(8,))


def test_attention_weights_come_back_per_face(tiny_run):
  predictor = Predictor(tiny_run[0])
  assert predictor.has_local_attention and predictor.attention_keys == ("alpha", "beta")
  faces = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
  probs, weights = predictor.predict_faces(faces, attention=True)
  assert probs.shape == (3, 7) and weights["alpha"].shape == (3, 36)
  np.testing.assert_allclose(weights["alpha"].sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(probs, predictor.predict_faces(faces), rtol=1e-6)


def test_predictor_refuses_wrong_crops(tiny_run):
  predictor = Predictor(tiny_run[0])
  with pytest.raises(ValueError, match="uint8"):
    predictor.predict_faces(np.zeros((2, 48, 48), np.float32))
  with pytest.raises(ValueError, match="48"):
    predictor.predict_faces(np.zeros((2, 64, 64), np.uint8))
  # No faces, as an empty list from a faceless frame: empty results, not an error.
  probs, weights = predictor.predict_faces([], attention=True)
  assert probs.shape == (0, 7) and weights["alpha"].shape == (0, 36)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_faces=2.5), "max_faces must be a whole number of at least 1, got 2.5"),
    (dict(max_faces=True), "max_faces must be a whole number of at least 1, got True"),
    (dict(batch_sizes=(2.0, 8)), r"batch_sizes must be whole numbers, got \(2.0, 8\)"),
])
def test_predictor_refuses_batch_sizes_that_are_not_whole_numbers(kwargs, message):
  # Before: max_faces=2.5 raised an AttributeError (no bit_length), and batch_sizes=(2.0, 8)
  # was accepted, to fail at the first predict_faces with a TypeError from numpy.
  from flax import nnx

  from ferjax.models import create_model
  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_MODEL)
  names = [str(i) for i in range(7)]
  with pytest.raises(ConfigError, match=message):
    Predictor.from_model(model, names, **kwargs)
  predictor = Predictor.from_model(model, names, max_faces=np.int64(4), batch_sizes=[np.int64(2)])
  assert predictor.batch_sizes == (2, 4)
  assert predictor.predict_faces(np.zeros((3, 48, 48), np.uint8)).shape == (3, 7)


def test_from_model_names_a_load_model_pair_a_name_string_and_a_batch_size_number():
  from ferjax.inference import default_weights_dir
  from ferjax.models import create_model
  pair = checkpoint_lib.load_model(default_weights_dir())
  # Before: AttributeError: 'tuple' object has no attribute 'eval'.
  with pytest.raises(ConfigError, match=r"model must be a ferjax model .*got tuple; load_model "
                                        r"returns \(model, meta\): unpack it"):
    Predictor.from_model(pair, pair[1]["class_names"])
  model = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_MODEL)
  # Before: "abcdefg" passed as seven one-letter class names.
  with pytest.raises(ConfigError, match="class_names must be a sequence of names, one per class"):
    Predictor.from_model(model, "abcdefg")
  # Before: TypeError: 'int' object is not iterable.
  with pytest.raises(ConfigError, match=r"batch_sizes must be a sequence of whole numbers, e\.g\. "
                                        r"\(1, 8\), got 4"):
    Predictor.from_model(model, [str(i) for i in range(7)], batch_sizes=4)
  assert Predictor.from_model(model, tuple("abcdefg"),
                              batch_sizes=np.array([2])).batch_sizes == (2, 8)


def test_a_which_that_is_not_a_step_names_the_argument():
  # Before: which=None raised a bare TypeError from int().
  from ferjax.inference import default_weights_dir
  for which in (None, [1]):
    message = f"expected best, latest or a step number, got {re.escape(repr(which))}"
    with pytest.raises(CheckpointError, match=r"which checkpoint \(--which\): " + message + "$"):
      checkpoint_lib.load_model(default_weights_dir(), which)
  # evaluate's --checkpoint is --which, realtime's is --workdir: a run's folder given as which.
  with pytest.raises(CheckpointError, match="that is a folder: name the run with --workdir$"):
    checkpoint_lib.load_model(default_weights_dir(), default_weights_dir())
  # The reverse: a checkpoint's name given as the run (realtime's --checkpoint is --workdir).
  for which in ("best", "latest", "12"):
    with pytest.raises(CheckpointError, match=f"{which}: no such directory; best, latest or a "
                       "step number picks a checkpoint with --which"):
      checkpoint_lib.load_model(which)
  with pytest.raises(CheckpointError, match="no-such-run: no such directory$"):
    checkpoint_lib.load_model("no-such-run")


def test_a_fractional_or_bool_which_is_not_rounded_to_a_step():
  # Before: int() turned which=1.5 (and True) into step 1, loaded if the run had it.
  from ferjax.inference import default_weights_dir
  for which in (1.5, True, float("inf")):
    message = f"expected best, latest or a step number, got {re.escape(repr(which))}$"
    with pytest.raises(CheckpointError, match=message):
      checkpoint_lib.load_model(default_weights_dir(), which)
  store = checkpoint_lib.CheckpointStore(checkpoint_lib.find_checkpoints(default_weights_dir()),
                                         read_only=True)
  try:
    step = store.latest_step()
    assert store.resolve(float(step)) == store.resolve(np.int64(step)) == step
  finally:
    store.close()


def test_missing_default_weights_or_checkpoint_is_a_checkpoint_error(tmp_path, monkeypatch):
  monkeypatch.setattr(inference, "DEFAULT_WEIGHTS", str(tmp_path / "weights" / "default"))
  with pytest.raises(CheckpointError, match="no default weights"):
    Predictor()
  with pytest.raises(CheckpointError, match="no such directory"):
    Predictor(tmp_path / "missing")


def test_attention_maps_png(tiny_run, tmp_path, caplog):
  workdir, csv_path = tiny_run
  out = tmp_path / "maps" / "attention.png"
  result = inference.render_attention_maps(str(out), checkpoint=workdir, data_path=csv_path,
                                           split="PrivateTest", num=10, columns=5)
  assert out.exists() and out.stat().st_size > 1000
  assert result["num"] == 10 and result["model"] == "acnn_alstm"
  # More faces than the split has: all of them, and a warning says so.
  with caplog.at_level(logging.WARNING, logger="ferjax"):
    result = inference.render_attention_maps(str(out), checkpoint=workdir, data_path=csv_path,
                                             split="PublicTest", num=10_000)
  n = len(data_lib.load_fer2013(csv_path).split("PublicTest"))
  assert result["num"] == n < 10_000
  assert f"--num=10000: PublicTest has {n} faces; drawing all of them" in caplog.text
  # A PNG written under another name would mislead: refused, and nothing is written.
  with pytest.raises(ConfigError, match=r"--output=.*maps\.txt: the figure is a PNG"):
    inference.render_attention_maps(str(tmp_path / "maps.txt"), checkpoint=workdir,
                                    data_path=csv_path)
  assert not (tmp_path / "maps.txt").exists()


def test_attention_maps_refuse_a_model_without_local_attention(tmp_path):
  from ferjax.models import create_model

  model = create_model("cnn_alstm", num_classes=7, rngs=nnx.Rngs(0), **TINY_MODEL)
  predictor = Predictor.from_model(model, [str(i) for i in range(7)])
  assert not predictor.has_local_attention and predictor.attention_keys == ("beta",)
  store = checkpoint_lib.CheckpointStore(tmp_path / "run" / "checkpoints")
  config = TrainConfig(model="cnn_alstm", model_overrides=TINY_MODEL).to_dict()
  state = nnx.state(model, nnx.Not(nnx.RngState))
  store.save(1, model=state, optimizer={"x": np.zeros(1)}, ema=None,
             meta={"config": config, "model": "cnn_alstm", "num_classes": 7, "labels": "fer2013",
                   "class_names": [str(i) for i in range(7)]})
  store.close()
  with pytest.raises(ConfigError, match="'cnn_alstm' model has no local attention"):
    inference.render_attention_maps(str(tmp_path / "a.png"), checkpoint=tmp_path / "run")


def test_shipped_default_weights_load_and_predict():
  predictor = Predictor()
  assert predictor.meta["model"] == "acnn_alstm" and predictor.num_classes == 7
  assert predictor.meta["metrics"]["eval_accuracy"] > 0.6  # Selected on PublicTest.
  crops = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
  probs = predictor.predict_faces(crops)
  assert probs.shape == (3, 7)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  for i in range(3):  # Alone, a face runs the batch-1 program (its LSTM loop compiled whole).
    np.testing.assert_allclose(predictor.predict_faces(crops[i]), probs[i:i + 1], rtol=1e-5,
                               atol=1e-6)


def test_shipped_default_weights_score_their_stated_privatetest_accuracy(fer2013_path, tmp_path):
  """The test above passes for any finite probabilities; here the weights are the ones
  README describes: 68.82 % on PrivateTest (plain, no TTA), 2,470 of its 3,589 faces (68.18 %,
  2,447, before their BatchNorm statistics were recomputed on the training faces)."""
  from ferjax.data import load_fer2013
  from ferjax.evaluate import evaluate_checkpoint
  from ferjax.inference import default_weights_dir
  test = load_fer2013(fer2013_path).split("PrivateTest")
  metrics = evaluate_checkpoint(default_weights_dir(), data=test, output_dir=str(tmp_path))
  assert metrics["num_examples"] == 3589
  # A face or two may flip with float rounding on another CPU; a wrong preprocess, crop or
  # parameter set costs far more.
  assert abs(metrics["accuracy"] * 3589 - 2470) <= 2, metrics["accuracy"]
