"""Batching, preprocessing and on-device augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax import augment as aug
from ferjax.evaluate import tta_views
from ferjax.errors import ConfigError
from ferjax.input_pipeline import TrainBatches, eval_batches
from ferjax.preprocess import PIXEL_MEAN, PIXEL_STD, preprocess


def _data(n=50):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8), np.arange(n, dtype=np.int32)


def test_train_batches_are_a_pure_function_of_seed_and_step():
  images, labels = _data()
  a = TrainBatches(images, labels, batch_size=8, seed=3)
  b = TrainBatches(images, labels, batch_size=8, seed=3)
  assert a.steps_per_epoch == 6  # The partial last batch is dropped.
  seen = np.concatenate([a.batch(s)["label"] for s in range(6)])
  assert len(np.unique(seen)) == 48  # An epoch visits distinct examples.
  # Random access (as after a resume) gives the same batches as sequential access.
  for step in (13, 2, 7, 13):
    np.testing.assert_array_equal(a.batch(step)["label"], b.batch(step)["label"])
    np.testing.assert_array_equal(a.batch(step)["image"], images[a.batch(step)["label"]])
  assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
  c = TrainBatches(images, labels, batch_size=8, seed=4)
  assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))


def test_train_batches_keep_soft_labels_with_their_faces():
  # Soft targets (FER+ votes, distillation) are gathered in the same (sorted) order as the
  # faces and labels; a target from another face would train on the wrong answer.
  images, labels = _data()
  soft = np.eye(50, dtype=np.float32)[labels]  # One column per face: says whose it is.
  batches = TrainBatches(images, labels, batch_size=8, seed=3, soft_labels=soft)
  for step in (0, 5, 9):
    batch = batches.batch(step)
    np.testing.assert_array_equal(batch["soft_label"].argmax(1), batch["label"])
    np.testing.assert_array_equal(batch["image"], images[batch["label"]])
  assert "soft_label" not in TrainBatches(images, labels, batch_size=8, seed=3).batch(0)


def test_train_batches_reject_batch_larger_than_data():
  images, labels = _data(5)
  with pytest.raises(ValueError, match="larger than the 5"):
    TrainBatches(images, labels, batch_size=8, seed=0)


def test_eval_batches_fixed_shape_every_example_once():
  images, labels = _data(21)
  batches = list(eval_batches(images, labels, 8))
  assert [b["image"].shape for b in batches] == [(8, 48, 48, 1)] * 3
  assert [int(b["mask"].sum()) for b in batches] == [8, 8, 5]
  got = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(got, labels)
  assert (batches[-1]["image"][5:] == 0).all()


def test_preprocess_standardises():
  x = preprocess(np.array([[0, 255]], np.uint8).reshape(1, 1, 2, 1))
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x).ravel(),
                             [(0 - PIXEL_MEAN) / PIXEL_STD, (1 - PIXEL_MEAN) / PIXEL_STD], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_preprocess_refuses_faces_that_are_not_uint8(dtype):
  # Before: float faces already in [0, 1] were divided by 255 again and standardised to a
  # near-constant image, silently.
  with pytest.raises(ValueError, match=f"preprocess takes uint8 faces.*got {np.dtype(dtype)}"):
    preprocess(np.zeros((1, 48, 48, 1), dtype))


def test_augment_is_deterministic_given_key_and_jittable():
  x = preprocess(_data(4)[0])
  config = aug.AugmentConfig(erase_prob=0.5)
  f = jax.jit(aug.augment, static_argnums=2)
  a = f(jax.random.key(0), x, config)
  b = f(jax.random.key(0), x, config)
  c = f(jax.random.key(1), x, config)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype


def test_no_augment_and_identity_warp_leave_images_unchanged():
  x = preprocess(_data(3)[0])
  np.testing.assert_array_equal(aug.augment(jax.random.key(0), x, aug.NO_AUGMENT), x)
  b = x.shape[0]
  same = aug.affine_warp(x, jnp.zeros(b), jnp.ones(b), jnp.zeros((b, 2)), jnp.zeros(b, bool))
  np.testing.assert_allclose(same, x, atol=1e-5)


def test_warp_flip_and_integer_shift_are_exact():
  x = preprocess(_data(2)[0])
  b = x.shape[0]
  flipped = aug.affine_warp(x, jnp.zeros(b), jnp.ones(b), jnp.zeros((b, 2)), jnp.ones(b, bool))
  np.testing.assert_allclose(flipped, x[:, :, ::-1], atol=1e-5)
  shift = jnp.asarray([[2.0, -3.0]] * b)  # dy=2 down, dx=3 left
  moved = aug.affine_warp(x, jnp.zeros(b), jnp.ones(b), shift, jnp.zeros(b, bool))
  np.testing.assert_allclose(moved[:, 2:, :-3], x[:, :-2, 3:], atol=1e-5)


def test_warp_rotates_about_the_centre():
  # Rotation was checked only against the PyTorch twin (skipped without torch). A half or a
  # quarter turn about the centre of the 48x48 grid maps pixels onto pixels: exact references.
  x = np.asarray(preprocess(_data(2)[0]))
  b = x.shape[0]

  def turned(degrees):
    return np.asarray(aug.affine_warp(jnp.asarray(x), jnp.full(b, np.radians(degrees)),
                                      jnp.ones(b), jnp.zeros((b, 2)), jnp.zeros(b, bool)))

  np.testing.assert_allclose(turned(180), x[:, ::-1, ::-1], atol=1e-4)
  quarter_turns = [np.rot90(x, k, axes=(1, 2)) for k in (1, -1)]
  plus = [np.allclose(turned(90), t, atol=1e-4) for t in quarter_turns]
  minus = [np.allclose(turned(-90), t, atol=1e-4) for t in quarter_turns]
  assert sorted(plus) == [False, True] and minus == plus[::-1]  # Opposite ways round.


def test_random_erasing_sets_a_rectangle_to_the_mean():
  x = jnp.ones((64, 48, 48, 1))
  out = aug.augment(jax.random.key(0), x, aug.AugmentConfig(
      max_shift=0, flip=False, max_rotation=0, max_scale=0, erase_prob=1.0))
  erased = np.asarray(out[..., 0] == 0)
  frac = erased.mean(axis=(1, 2))
  assert ((frac > 0.005) & (frac < 0.3)).all()
  rows, cols = erased.any(axis=2), erased.any(axis=1)
  # The erased pixels of each image form one filled rectangle.
  assert (erased.sum(axis=(1, 2)) == rows.sum(1) * cols.sum(1)).all()


def test_random_warp_draws_within_the_configured_ranges(monkeypatch):
  # The other augment tests accept any change to the faces; here the drawn angles, scales,
  # shifts and flips themselves are checked (a rotation in radians taken as degrees, or a
  # range off by a factor, would still "augment").
  drawn = {}
  real = aug.affine_warp

  def spy(x, angle_B, scale_B, shift_Bx2, flip_B):
    drawn.update(angle=np.degrees(np.asarray(angle_B)), scale=np.asarray(scale_B),
                 shift=np.asarray(shift_Bx2), flip=np.asarray(flip_B))
    return real(x, angle_B, scale_B, shift_Bx2, flip_B)

  monkeypatch.setattr(aug, "affine_warp", spy)
  x = jnp.zeros((512, 48, 48, 1))
  aug.augment(jax.random.key(0), x, aug.AugmentConfig(max_shift=3.0, max_rotation=10.0,
                                                      max_scale=0.2))
  for name, low, high in (("angle", -10, 10), ("scale", 0.8, 1.2)):
    v = drawn[name]
    assert low <= v.min() < low + 0.1 * (high - low), name  # Uniform over the whole range.
    assert high - 0.1 * (high - low) < v.max() <= high, name
  assert drawn["shift"].shape == (512, 2) and (np.abs(drawn["shift"]) <= 3).all()
  assert (drawn["shift"].min(0) < -2.5).all() and (drawn["shift"].max(0) > 2.5).all()
  assert 0.4 < drawn["flip"].mean() < 0.6
  aug.augment(jax.random.key(0), x, aug.AugmentConfig(max_shift=3.0, flip=False,
                                                      max_rotation=0.0, max_scale=0.0))
  assert not drawn["flip"].any() and (drawn["angle"] == 0).all() and (drawn["scale"] == 1).all()


@pytest.mark.parametrize("tta,views", [("none", 1), ("flip", 2), ("ten_crop", 10)])
def test_tta_views(tta, views):
  x = preprocess(_data(3)[0])
  v = tta_views(x, tta)
  assert v.shape == (views, 3, 48, 48, 1)
  if tta == "ten_crop":  # Five crops, each followed by its mirror image.
    np.testing.assert_allclose(v[1], v[0][:, :, ::-1], atol=1e-4)
    np.testing.assert_allclose(v[9], v[8][:, :, ::-1], atol=1e-4)
    assert not np.allclose(v[0], v[2])
  else:
    np.testing.assert_allclose(v[0], x, atol=1e-5)  # The first view is the face itself.
  if tta == "flip":
    np.testing.assert_allclose(v[1], x[:, :, ::-1], atol=1e-5)


@pytest.mark.parametrize("tta", ["none", "flip", "ten_crop"])
def test_predict_probs_averages_the_probabilities_of_the_views(tta):
  from ferjax.evaluate import predict_probs
  images = _data(3)[0]
  w = jax.random.normal(jax.random.key(0), (48 * 48, 5)) * 0.05
  model_fn = lambda x: x.reshape(x.shape[0], -1) @ w  # Logits that differ between views.
  logits = [model_fn(v) for v in tta_views(preprocess(images), tta)]
  expected = np.mean([jax.nn.softmax(v, axis=-1) for v in logits], axis=0)
  got = np.asarray(predict_probs(model_fn, images, tta))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  if tta != "none":  # The mean of the probabilities, not the softmax of the mean logits.
    assert not np.allclose(got, jax.nn.softmax(np.mean(logits, axis=0), axis=-1), atol=1e-3)


def test_ten_crop_views_are_the_five_44px_crops_scaled_to_48():
  import cv2
  x = np.asarray(preprocess(_data(2)[0]))
  v = np.asarray(tta_views(jnp.asarray(x), "ten_crop"))
  # OpenCV's linear resize uses the same pixel-centre convention; compare inside a 1-pixel
  # border, where the warp reads the image just outside the crop and OpenCV clamps.
  found = []
  for r0, c0 in ((2, 2), (0, 0), (0, 4), (4, 0), (4, 4)):
    expected = np.stack([cv2.resize(img[r0:r0 + 44, c0:c0 + 44, 0], (48, 48),
                                    interpolation=cv2.INTER_LINEAR) for img in x])[..., None]
    matches = [k for k in range(0, 10, 2)
               if np.allclose(v[k][:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-4)]
    assert len(matches) == 1, (r0, c0)
    found += matches
  assert found[0] == 0 and sorted(found) == [0, 2, 4, 6, 8]  # Centre first, each corner once.


def _mix_inputs(b=32):
  x = jax.random.normal(jax.random.key(0), (b, 48, 48, 1))
  labels = jnp.arange(b)  # A class per face, so each target tells whose share it holds.
  return x, jax.nn.one_hot(labels, b), 1.0 + labels.astype(jnp.float32)  # Distinct weights.


def test_mixup_blends_images_targets_and_weights_in_the_same_proportion():
  x, t, w = _mix_inputs()
  config = aug.AugmentConfig(mixup_alpha=0.4)
  xo, to, wo = jax.jit(aug.mix_batch, static_argnums=4)(jax.random.key(1), x, t, w, config)
  partner = np.asarray(aug.mix_partners(jax.random.fold_in(jax.random.key(1), 1), 32))
  lam = np.asarray(to)[np.arange(32), np.asarray(t).argmax(1)]  # Share of its own class.
  assert ((lam > 0.0) & (lam < 1.0)).all() and lam.std() > 0.1  # Beta draws, one per face.
  np.testing.assert_allclose(xo, lam[:, None, None, None] * x
                             + (1 - lam[:, None, None, None]) * x[partner], atol=1e-5)
  np.testing.assert_allclose(to, lam[:, None] * t + (1 - lam[:, None]) * t[partner], atol=1e-6)
  np.testing.assert_allclose(wo, lam * w + (1 - lam) * w[partner], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(to).sum(1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_rectangle_and_mixes_targets_by_its_area():
  x, t, w = _mix_inputs()
  xo, to, _ = aug.mix_batch(jax.random.key(2), x, t, w, aug.AugmentConfig(cutmix_alpha=1.0))
  partner_B = np.asarray(aug.mix_partners(jax.random.fold_in(jax.random.key(2), 1), 32))
  xo, x = np.asarray(xo), np.asarray(x)
  partner = x[partner_B]
  pasted = (xo == partner) & (xo != x)
  assert ((xo == x) | pasted).all()  # Every pixel is its own or the partner's.
  pasted = pasted[..., 0]
  rows, cols = pasted.any(axis=2), pasted.any(axis=1)
  assert (pasted.sum(axis=(1, 2)) == rows.sum(1) * cols.sum(1)).all()  # One filled rectangle.
  own = np.asarray(to)[np.arange(32), np.asarray(t).argmax(1)]
  np.testing.assert_allclose(own, 1 - pasted.mean(axis=(1, 2)), atol=1e-6)
  assert 0.2 < pasted.mean() < 0.8


def test_mix_partners_ignore_the_batch_order():
  # One cycle through the batch: every face is some face's partner, none its own.
  for seed in range(5):
    partner = np.asarray(aug.mix_partners(jax.random.key(seed), 64))
    assert sorted(partner) == list(range(64)) and (partner != np.arange(64)).all()
    seen, i = set(), 0
    while i not in seen:
      seen.add(i)
      i = partner[i]
    assert len(seen) == 64
  # A batch sorted by class (as the pipeline's sorted gathers give for an image folder,
  # stored class by class) still mixes across classes about as often as chance.
  labels = np.repeat(np.arange(7), 10)[:64]
  same = np.mean([(labels[np.asarray(aug.mix_partners(jax.random.key(s), 64))] == labels).mean()
                  for s in range(50)])
  assert same < 0.25  # Chance: about 0.14; pairing each face with the one before: 0.89.


def test_mix_batch_draws_each_random_choice_from_a_key_of_its_own(monkeypatch):
  # split(k, n)[i] is fold_in(k, i): a partner key of fold_in(key, 1) was also the key
  # that chose mixup or CutMix for each face.
  used = []
  for name in ("bernoulli", "beta", "uniform"):
    real = getattr(jax.random, name)
    monkeypatch.setattr(jax.random, name, lambda key, *a, _real=real, **k: (
        used.append(np.asarray(jax.random.key_data(key)).tobytes()), _real(key, *a, **k))[1])
  real_partners = aug.mix_partners
  monkeypatch.setattr(aug, "mix_partners", lambda key, b: (
      used.append(np.asarray(jax.random.key_data(key)).tobytes()), real_partners(key, b))[1])
  x, t, w = _mix_inputs()
  aug.mix_batch(jax.random.key(4), x, t, w, aug.AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0,
                                                             mix_prob=0.5))
  assert len(used) == 7 and len(set(used)) == 7


def test_mixing_is_off_by_default_and_mix_prob_picks_faces():
  x, t, w = _mix_inputs()
  assert not aug.AugmentConfig().mixes and not aug.AugmentConfig(mixup_alpha=1.0, mix_prob=0).mixes
  both = aug.AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5)
  xo, to, wo = aug.mix_batch(jax.random.key(3), x, t, w, both)
  untouched = np.asarray(to).max(1) == 1.0
  assert 4 <= untouched.sum() <= 28  # About half of the faces are not mixed...
  np.testing.assert_array_equal(np.asarray(xo)[untouched], np.asarray(x)[untouched])  # ...exactly.
  np.testing.assert_array_equal(np.asarray(wo)[untouched], np.asarray(w)[untouched])


@pytest.mark.parametrize("option,value", [
    ("mix_prob", 1.5), ("mixup_alpha", -1.0), ("erase_prob", -0.1), ("flip", "no"),
    ("erase_area", 0.1), ("erase_area", (0.3, 0.1)), ("erase_area", (0.1, 1.5)),
    ("erase_aspect", (0, 3)), ("erase_aspect", (1, 2, 3)),
    # A scale drawn from 1 ± 1.5 can be 0 or negative: the warp divides by it.
    ("max_scale", 1.0), ("max_scale", 1.5)])
def test_bad_augment_options_are_refused(option, value):
  with pytest.raises(ConfigError, match=f"augment option {option}="):
    aug.AugmentConfig(**{option: value})
