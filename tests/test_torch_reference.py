"""The PyTorch reference models (benchmarks/torch_models.py) against ferjax: counts, logits, warps.

Skipped when PyTorch (the ``bench`` extra) is not installed, as in CI.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

# benchmarks/ is a top-level package of the repository, not of the installed ferjax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import torch_models as tm  # noqa: E402
from ferjax import models  # noqa: E402
from ferjax.augment import affine_warp  # noqa: E402
from ferjax.config import default_config  # noqa: E402
from ferjax.errors import ConfigError  # noqa: E402
from ferjax.models.summary import count_params  # noqa: E402

# Small variants: the options of build other than the registered defaults.
SMALL_VARIANTS = {
    "cnn_lstm_bidir_2layers_plain": ("cnn_lstm", dict(widths=(8, 16, 16), pool_after=(0, 1, 2),
                                                      batch_norm=False, lstm_hidden=12,
                                                      lstm_layers=2, bidirectional=True)),
    "acnn_alstm_bidir_plain": ("acnn_alstm", dict(widths=(8, 16, 16), pool_after=(0, 1, 2),
                                                  batch_norm=False, lstm_hidden=12,
                                                  bidirectional=True, attention_size=10)),
    "cnn_alstm_small": ("cnn_alstm", dict(widths=(8, 8, 16, 16), lstm_hidden=12,
                                          attention_size=10)),
    "vgg_alstm_small": ("vgg_alstm", dict(widths=(4, 4, 8, 8, 8, 8, 16, 16), lstm_hidden=12,
                                          attention_size=10)),
    "dnn_small": ("dnn", dict(width=8, fc_sizes=(16, 12))),
}


def _abstract_ferjax(name, num_classes=7, **overrides):
  """Shapes only: full-size models without spending time on initialisation."""
  return nnx.eval_shape(lambda: models.create_model(name, num_classes=num_classes,
                                                    rngs=nnx.Rngs(0), **overrides))


def _lstm_bias_offset(name, **overrides):
  """The one documented count difference: nn.LSTM's second bias, 4H per layer and direction.

  The twin keeps it (``b_hh``) at zero and frozen, so it is not trainable;
  ferjax's LSTM has a single bias.
  """
  if name == "dnn":
    return 0
  options = {**models.model_options(name), **overrides}
  directions = 2 if options["bidirectional"] else 1
  return options["lstm_layers"] * directions * 4 * options["lstm_hidden"]


def _build_shapes_only(name, num_classes=7, **overrides):
  with torch.device("meta"):  # Shapes without running the initialisers: counting is all.
    return tm.build(name, num_classes, **overrides)


def _check_counts(ours, name, num_classes=7, **overrides):
  theirs = count_params(_abstract_ferjax(name, num_classes, **overrides))
  offset = _lstm_bias_offset(name, **overrides)
  assert tm.count_params(ours) == theirs  # Trainable parameters: exactly equal.
  assert tm.frozen_param_count(ours) == offset
  assert sum(p.numel() for p in ours.parameters()) == theirs + offset


@pytest.mark.parametrize("name, num_classes",
                         [(name, 7) for name in models.model_names()] + [("acnn_alstm", 8)])
def test_parameter_counts_equal_ferjax(name, num_classes):
  _check_counts(_build_shapes_only(name, num_classes), name, num_classes)


@pytest.mark.parametrize("variant", sorted(SMALL_VARIANTS))
def test_parameter_counts_equal_ferjax_with_overrides(variant):
  name, overrides = SMALL_VARIANTS[variant]
  _check_counts(_build_shapes_only(name, **overrides), name, **overrides)


def test_build_rejects_unknown_model_and_option():
  with pytest.raises(ConfigError, match="unknown model"):
    tm.build("resnet")
  with pytest.raises(ConfigError, match="no option 'width'"):
    tm.build("acnn_alstm", width=3)


def _random_ferjax_model(name, seed=0, **overrides):
  """A ferjax model with random parameters and BatchNorm statistics, built without compiling.

  Random biases, BatchNorm scales and statistics (not the init's 0s and 1s)
  make a swapped or missing copy show in the logits; filling numpy values into
  an abstract model avoids compiling ferjax's initialisers, which dominates
  the time otherwise.
  """
  abstract = nnx.eval_shape(lambda: models.create_model(name, num_classes=7, rngs=nnx.Rngs(0),
                                                        **overrides))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # Dropout's stream: unused in eval mode.
      return jax.random.key(0)
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.zeros(x.shape, x.dtype)
    field = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if field == "var":
      value = rng.uniform(0.5, 2.0, x.shape)
    elif field == "scale":
      value = rng.uniform(0.5, 1.5, x.shape)
    elif len(x.shape) > 1:  # Kernels: unit-variance activations, fan-in = all but the last axis.
      value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(x.shape[:-1])), x.shape)
    else:
      value = rng.normal(0.0, 0.2, x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _logits_both(name, seed=0, **overrides):
  ferjax_model = _random_ferjax_model(name, seed, **overrides)
  ferjax_model.eval()
  ours = tm.build(name, **overrides)
  tm.copy_from_ferjax(ours, ferjax_model)
  ours.eval()
  x = np.random.default_rng(seed).normal(size=(3, 48, 48, 1)).astype(np.float32)
  graphdef, state = nnx.split(ferjax_model)
  expected = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))
  with torch.no_grad():
    got = ours(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  return np.asarray(expected), got.numpy()


@pytest.mark.parametrize("name", ["dnn", "acnn_alstm"])
def test_logits_match_ferjax_full_size(name):
  expected, got = _logits_both(name)
  assert np.abs(expected).max() > 0.05  # Not trivially zero.
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_logits_match_ferjax_without_batch_norm_two_bidirectional_layers():
  # The code paths the default models do not take: biased convolutions, a second LSTM
  # layer, the backward direction and its final state (read at step 1).
  name, overrides = SMALL_VARIANTS["cnn_lstm_bidir_2layers_plain"]
  expected, got = _logits_both(name, **overrides)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_channels_last_gives_the_same_logits():
  model = tm.build("acnn_alstm", widths=(8, 8, 16, 16), lstm_hidden=12).eval()
  x = torch.randn(2, 1, 48, 48)
  with torch.no_grad():
    nchw = model(x)
    model = model.to(memory_format=torch.channels_last)
    nhwc = model(x.contiguous(memory_format=torch.channels_last))
  torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)


def test_affine_warp_matches_ferjax():
  rng = np.random.default_rng(0)
  b = 6
  x = rng.normal(size=(b, 48, 48, 1)).astype(np.float32)
  angle = rng.uniform(-1, 1, b).astype(np.float32) * math.radians(10)
  scale = (1 + rng.uniform(-0.1, 0.1, b)).astype(np.float32)
  shift = rng.uniform(-4, 4, (b, 2)).astype(np.float32)
  flip = np.array([False, True] * (b // 2))
  expected = np.asarray(affine_warp(jnp.asarray(x), jnp.asarray(angle), jnp.asarray(scale),
                                    jnp.asarray(shift), jnp.asarray(flip)))
  got = tm.affine_warp(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(angle),
                       torch.from_numpy(scale), torch.from_numpy(shift), torch.from_numpy(flip))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-4)


def test_warmup_cosine_lr_matches_optax():
  import optax
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, 50, 2e-6)
  for step in (0, 3, 10, 11, 30, 50, 60):
    assert tm.warmup_cosine_lr(step, 2e-3, 10, 50) == pytest.approx(float(schedule(step)),
                                                                    rel=1e-5, abs=1e-9)


def test_train_step_updates_parameters_and_keeps_the_second_lstm_bias_zero():
  torch.manual_seed(0)
  model = tm.build("acnn_alstm", widths=(8, 8, 16, 16), lstm_hidden=12, attention_size=10)
  step = tm.TrainStep(model, default_config("acnn_alstm"), total_steps=100, steps_per_epoch=10)
  before = [p.detach().clone() for p in step.params]
  images = torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8)
  labels = torch.randint(0, 7, (8,))
  for i in range(3):
    loss, correct = step(images, labels, i + 1)
    assert math.isfinite(float(loss)) and 0 <= int(correct) <= 8
  assert all(not torch.equal(a, p) for a, p in zip(before, step.params, strict=True))
  assert float(model.lstm.bias_hh_l0.abs().max()) == 0.0
