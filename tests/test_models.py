"""Models: shapes, modes, attention behaviour, reference implementations, parameter counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ferjax import models
from ferjax.errors import ConfigError
from ferjax.models import layers

# Tiny variants keep the tests fast; the structure is the full models'.
TINY = {
    "vgg_alstm": dict(widths=(4, 4, 4, 4, 8, 8, 8, 8), lstm_hidden=8, attention_size=8),
    "dnn": dict(width=4, fc_sizes=(8, 8)),
    "cnn_lstm": dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8),
    "cnn_alstm": dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8),
    "acnn_alstm": dict(widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8),
}


def tiny(name, num_classes=7, seed=0, **extra):
  return models.create_model(name, num_classes=num_classes, rngs=nnx.Rngs(seed, dropout=seed + 1),
                             **{**TINY[name], **extra})


def images(b=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 48, 48, 1)), jnp.float32)


def test_registry_covers_every_model():
  assert set(TINY) == set(models.model_names())


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("num_classes", [7, 8])
def test_shapes_finite_and_jit_agrees(name, num_classes):
  model = tiny(name, num_classes)
  model.eval()
  x = images()
  eager = model(x)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  assert eager.shape == (3, num_classes)
  assert np.isfinite(np.asarray(eager)).all()
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
  # Logits, not probabilities: rows do not sum to 1.
  assert not np.allclose(np.asarray(eager).sum(-1), 1.0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_dropout_on_in_train_mode_off_in_eval(name):
  model = tiny(name, dropout=0.5)
  x = images()
  model.train()
  a, b = model(x), model(x)  # The dropout stream advances between calls.
  assert not np.allclose(a, b)
  model.eval()
  c, d = model(x), model(x)
  np.testing.assert_array_equal(c, d)


@pytest.mark.parametrize("name,keys", [("cnn_lstm", set()), ("cnn_alstm", {"beta"}),
                                       ("acnn_alstm", {"alpha", "beta"}), ("dnn", set())])
def test_attention_weights_are_distributions(name, keys):
  model = tiny(name)
  model.eval()
  _, aux = model.forward(images(4))
  assert set(aux) == keys
  for w in aux.values():
    assert w.shape == (4, 36)  # 36 positions of the 6x6 map; 36 LSTM steps.
    assert (np.asarray(w) >= 0).all()
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["dnn", "acnn_alstm"])
@pytest.mark.parametrize("x, message", [
    # uint8 faces without preprocess: before, they ran to meaningless logits, silently.
    (np.zeros((2, 48, 48, 1), np.uint8), r"model input must be float.*got uint8.*preprocess"),
    # One face without its batch axis, grey faces without the channel axis: before, a
    # "not enough values to unpack" from a reshape and a convolution's feature-size error.
    (np.zeros((48, 48, 1), np.float32), r"must be \(B, H, W, 1\), got shape \(48, 48, 1\)"),
    (np.zeros((2, 48, 48), np.float32), r"must be \(B, H, W, 1\), got shape \(2, 48, 48\)"),
])
def test_model_input_of_the_wrong_dtype_or_shape_is_refused(name, x, message):
  model = tiny(name)
  for call in (model, model.forward):
    with pytest.raises(ValueError, match=message):
      call(x)


def test_dnn_refuses_another_input_size_and_takes_an_empty_batch():
  model = tiny("dnn")
  model.eval()
  # Before: a dot_general "contracting dimensions" TypeError from its dense layer (the
  # attention models take other sizes: their LSTM runs over more positions).
  with pytest.raises(ValueError, match=r"model input must be \(B, 48, 48, 1\) for this model "
                                       r"\(image_size=48\), got shape \(2, 64, 64, 1\); "
                                       "resize the faces to 48x48"):
    model(jnp.zeros((2, 64, 64, 1)))
  # Before: a ZeroDivisionError from reshape(0, -1).
  assert model(jnp.zeros((0, 48, 48, 1))).shape == (0, 7)
  assert tiny("dnn", image_size=24)(jnp.zeros((1, 24, 24, 1))).shape == (1, 7)


def test_lstm_runs_over_36_steps_and_every_position_matters():
  model = tiny("acnn_alstm")
  model.eval()
  fmap = model.trunk(images(2))
  assert fmap.shape == (2, 6, 6, 8)

  def logit_sum(f):
    return model.head(f)[0].sum()

  grad = jax.grad(logit_sum)(fmap)
  per_position = np.abs(np.asarray(grad)).sum(axis=(0, 3)).ravel()
  assert per_position.shape == (36,) and (per_position > 0).all()


def test_local_attention_reacts_to_one_position_and_reweights_the_sequence():
  model = tiny("acnn_alstm")
  model.eval()
  fmap = model.trunk(images(1))
  _, aux = model.head(fmap)
  bumped = fmap.at[0, 2, 3].multiply(5.0).at[0, 2, 3].add(3.0)  # Position 2*6+3 = 15.
  _, aux2 = model.head(bumped)
  delta = np.abs(np.asarray(aux2["alpha"] - aux["alpha"]))[0]
  assert delta[15] > 0 and delta[15] == delta.max()
  # Uniform attention (a zero query scores every position alike) leaves the features
  # unchanged, thanks to the 36 * alpha scaling: the model equals the same model without it.
  model.local_attention.query[...] = jnp.zeros_like(model.local_attention.query[...])
  logits, aux = model.head(fmap)
  np.testing.assert_allclose(aux["alpha"], np.full((1, 36), 1 / 36), rtol=1e-6)
  without = nnx.clone(model)
  without.local_attention = None
  np.testing.assert_allclose(logits, without.head(fmap)[0], rtol=1e-5, atol=1e-6)


def test_head_reweights_positions_by_alpha_and_pools_the_lstm_states_by_beta():
  # The head written out from its submodules: position n scaled by 36 * alpha_n, the
  # classifier reading sum_t beta_t h_t. Sharpened queries make both attentions far from
  # uniform, so a pooling that ignored beta (a mean, a last state) or alpha misplaced in the
  # sequence gives other logits.
  model = tiny("acnn_alstm")
  model.eval()
  for attention in (model.local_attention, model.global_attention):
    attention.query[...] = attention.query[...] * 30.0
  fmap = model.trunk(images(2))
  logits, aux = model.head(fmap)
  feats = fmap.reshape(2, 36, -1)  # Row-major positions.
  alpha = model.local_attention(feats)
  assert float(alpha.max()) > 3 / 36  # Far from uniform.
  h = model.lstm(feats * 36 * alpha[..., None])
  beta = model.global_attention(h)
  assert float(beta.max()) > 3 / 36
  np.testing.assert_allclose(aux["alpha"], alpha, rtol=1e-6)
  np.testing.assert_allclose(aux["beta"], beta, rtol=1e-5, atol=1e-7)
  context = jnp.einsum("bt,bth->bh", beta, h)
  np.testing.assert_allclose(logits, model.classifier(context), rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits, model.classifier(h.mean(axis=1)), atol=1e-4)


def test_without_local_attention_alpha_is_absent_and_option_switches_it():
  assert "alpha" not in tiny("acnn_alstm", local_attention=False).forward(images(1))[1]


def test_bidirectional_multilayer_lstm_options():
  model = tiny("acnn_alstm", lstm_layers=2, bidirectional=True)
  model.eval()
  logits, aux = model.forward(images(2))
  assert logits.shape == (2, 7) and aux["beta"].shape == (2, 36)
  assert model.lstm.output_size == 16 and len(model.lstm.forward_layers) == 2


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_final_state_has_read_the_whole_sequence_in_each_direction(bidirectional):
  # cnn_lstm classifies from final_state: step T of the forward direction, step 1 of the
  # backward one. Read at the wrong end, a direction's state has seen only one input step.
  # (Otherwise checked only in test_torch_reference.py, which is skipped without torch.)
  lstm = layers.StackedLSTM(3, 4, bidirectional=bidirectional, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 3)), jnp.float32)
  jac = jax.jacobian(lambda x: lstm.final_state(lstm(x))[0])(x)
  assert jac.shape == (lstm.output_size, 1, 5, 3)
  per_step = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (output unit, input step)
  assert (per_step > 1e-6).all()


def _lstm_reference(x, w_ih, b, w_hh, reverse=False):
  """A plain per-step LSTM in numpy, gates (i, f, g, o)."""
  sig = lambda v: 1 / (1 + np.exp(-v))
  bsz, t, _ = x.shape
  hs = w_hh.shape[0]
  h, c = np.zeros((bsz, hs)), np.zeros((bsz, hs))
  out = np.zeros((bsz, t, hs))
  for step in (range(t - 1, -1, -1) if reverse else range(t)):
    gates = x[:, step] @ w_ih + b + h @ w_hh
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    h = sig(o) * np.tanh(c)
    out[:, step] = h
  return out


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_matches_reference(reverse):
  lstm = layers.LSTM(5, 6, rngs=nnx.Rngs(0), reverse=reverse)
  x = np.random.default_rng(1).normal(size=(2, 7, 5)).astype(np.float32)
  ours = np.asarray(lstm(jnp.asarray(x)))
  ref = _lstm_reference(x.astype(np.float64), np.asarray(lstm.input_proj.kernel[...]),
                        np.asarray(lstm.input_proj.bias[...]),
                        np.asarray(lstm.hidden_proj.kernel[...]), reverse)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  assert np.asarray(lstm.input_proj.bias[...])[6:12].tolist() == [1.0] * 6  # Forget bias.


def _tie_free(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape),
                     jnp.float32) / np.prod(shape)


@pytest.mark.parametrize("size", [48, 24, 13])
def test_max_pool_same_matches_reduce_window(size):
  x = _tie_free((2, size, size, 3))
  ref = lambda x: nnx.max_pool(x, (3, 3), (2, 2), padding="SAME")
  np.testing.assert_array_equal(layers.max_pool_same(x), ref(x))
  g_ours = jax.grad(lambda x: (layers.max_pool_same(x) ** 2).sum())(x)
  g_ref = jax.grad(lambda x: (ref(x) ** 2).sum())(x)
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6)


def test_max_pool_2x2_matches_reduce_window():
  x = _tie_free((2, 12, 12, 3))
  ref = lambda x: nnx.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), ref(x))
  np.testing.assert_allclose(jax.grad(lambda x: (layers.max_pool_2x2(x) ** 2).sum())(x),
                             jax.grad(lambda x: (ref(x) ** 2).sum())(x), rtol=1e-6)


def test_max_pool_2x2_gradient_with_ties_matches_select_and_scatter():
  # ReLU outputs tie at zero all the time; the gradient must go where
  # lax.reduce_window's select_and_scatter sends it (the first maximum).
  x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, (2, 8, 8, 4)), jnp.float32)
  ref = lambda x: nnx.max_pool(x, (2, 2), (2, 2))
  w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 4)), jnp.float32)
  np.testing.assert_array_equal(jax.grad(lambda x: (layers.max_pool_2x2(x) * w).sum())(x),
                                jax.grad(lambda x: (ref(x) * w).sum())(x))


def test_lrn_has_tensorflow_semantics():
  x = np.random.default_rng(0).normal(size=(1, 2, 2, 12)).astype(np.float32) * 20
  out = np.asarray(layers.LocalResponseNorm()(jnp.asarray(x)))
  ref = np.empty_like(x)
  for c in range(12):
    window = x[..., max(0, c - 4):c + 5]
    ref[..., c] = x[..., c] / (1 + (0.001 / 9) * (window ** 2).sum(-1)) ** 0.75
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def _count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_parameter_counts_match_the_architecture():
  # dnn: conv5x5x64, conv3x3x64, fc(12*12*64 -> 384), fc384->192, fc192->7; all with biases.
  dnn = models.create_model("dnn", num_classes=7, rngs=nnx.Rngs(0))
  assert _count(dnn) == (25 * 64 + 64) + (9 * 64 * 64 + 64) + (9216 * 384 + 384) + \
      (384 * 192 + 192) + (192 * 7 + 7)
  # acnn_alstm: BN trunk (no conv bias), LSTM(128), two attentions (W, b, u), classifier.
  widths, hs, att = (32, 64, 128, 128), 128, 128
  trunk = sum(9 * cin * cout + 2 * cout for cin, cout in zip((1,) + widths[:-1], widths))
  lstm = 128 * 4 * hs + 4 * hs + hs * 4 * hs
  attention = lambda d: d * att + att + att
  head = hs * 7 + 7
  full = models.create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0))
  assert _count(full) == trunk + attention(128) + lstm + attention(hs) + head
  no_local = models.create_model("cnn_alstm", num_classes=7, rngs=nnx.Rngs(0))
  assert _count(no_local) == trunk + lstm + attention(hs) + head
  plain = models.create_model("cnn_lstm", num_classes=7, rngs=nnx.Rngs(0))
  assert _count(plain) == trunk + lstm + head
  # vgg_alstm: two BN convs per stage (32-64-128-256), LSTM(256), attentions of size 128.
  widths, hs = (32, 32, 64, 64, 128, 128, 256, 256), 256
  trunk = sum(9 * cin * cout + 2 * cout for cin, cout in zip((1,) + widths[:-1], widths))
  lstm = 256 * 4 * hs + 4 * hs + hs * 4 * hs
  vgg = nnx.eval_shape(lambda: models.create_model("vgg_alstm", num_classes=7, rngs=nnx.Rngs(0)))
  assert _count(vgg) == trunk + attention(256) + lstm + attention(hs) + hs * 7 + 7


def test_unknown_model_and_option_errors():
  with pytest.raises(ConfigError, match="unknown model 'resnet'.*acnn_alstm"):
    models.create_model("resnet", num_classes=7, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="no option hidden.*lstm_hidden"):
    models.create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), hidden=3)


@pytest.mark.parametrize("num_classes", [0, 1, "7", 7.0, True])
def test_a_bad_number_of_classes_is_a_config_error(num_classes):
  # Before: 0 raised ZeroDivisionError from the initialiser and "7" a TypeError from JAX.
  for name in ("dnn", "acnn_alstm"):
    with pytest.raises(ConfigError, match=f"num_classes must be a whole number of at least 2, "
                                          f"got {num_classes!r}"):
      models.create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rngs", [0, None])
def test_rngs_that_are_not_nnx_rngs_are_a_config_error(rngs):
  # Before: an AttributeError ('int' object has no attribute 'params') from the first layer.
  with pytest.raises(ConfigError, match=f"rngs must be a flax.nnx.Rngs, e.g. rngs=nnx.Rngs\\(0\\), "
                                        f"got {rngs!r}"):
    models.create_model("dnn", num_classes=7, rngs=rngs)


@pytest.mark.parametrize("name,option,value,need", [
    ("acnn_alstm", "bidirectional", "no", "true or false"),
    ("acnn_alstm", "lstm_hidden", 0, "a whole number of at least 1"),
    ("acnn_alstm", "lstm_layers", 2.5, "a whole number of at least 1"),
    ("dnn", "width", "abc", "a whole number of at least 1"),
    ("dnn", "dropout", 2, r"a rate in \[0, 1\)"),
    ("vgg_alstm", "dropout", True, r"a rate in \[0, 1\)"),
    ("acnn_alstm", "widths", 8, "a tuple of whole numbers of at least 1"),
    ("dnn", "fc_sizes", (8, -1), "a tuple of whole numbers of at least 1"),
    ("cnn_lstm", "pool_after", (0, -1), "a tuple of whole numbers of at least 0"),
])
def test_bad_option_values_are_refused_by_name(name, option, value, need):
  # Before, dropout=2 trained silently and bidirectional="no" built a bidirectional LSTM.
  with pytest.raises(ConfigError, match=f"model option {option}=.*: must be {need}"):
    models.create_model(name, num_classes=7, rngs=nnx.Rngs(0), **{option: value})
  from ferjax.config import TrainConfig
  with pytest.raises(ConfigError, match=f"model option {option}=.*: must be {need}"):
    TrainConfig(model=name, model_overrides={option: value})


def test_good_option_values_pass_the_check():
  models.check_options("acnn_alstm", dict(bidirectional=True, lstm_hidden=8, dropout=0.0,
                                          widths=[4, 4, 8, 8], pool_after=(0, 1, 3)))
  models.check_options("dnn", dict(fc_sizes=(8, 8), width=4, dropout=0.25))
  assert models.model_options("cnn_lstm")["local_attention"] is False
  assert math.isclose(models.model_options("acnn_alstm")["dropout"], 0.5)


def test_summary_table_counts_match_the_model():
  from ferjax.models.summary import count_params, model_cost, summarize
  s = summarize("acnn_alstm", widths=(4, 4, 8, 8), lstm_hidden=8, attention_size=8)
  model = tiny("acnn_alstm")
  assert s.params == count_params(model) == sum(r.params for r in s.rows)
  # The results table's count (the whole model, one compilation) is the table's total.
  assert model_cost("acnn_alstm", widths=(4, 4, 8, 8), lstm_hidden=8,
                    attention_size=8) == (s.params, s.mflops)
  assert [r.path for r in s.rows][:4] == [f"trunk/blocks/{i}" for i in range(4)]
  assert s.rows[3].output_shape == (1, 12, 12, 8)
  assert s.mflops >= sum(r.mflops for r in s.rows) * 0.99 > 0
  assert "| **total** |" in s.markdown()


def test_summary_counts_every_lstm_step():
  from ferjax.models.summary import summarize
  s = summarize("cnn_lstm", widths=(4, 4, 8, 8), lstm_hidden=8)
  (lstm,) = [r for r in s.rows if r.path == "lstm"]
  matmul_flops = 2 * 36 * (8 * 32 + 8 * 32)  # Input and recurrent projections, 36 steps.
  assert lstm.mflops * 1e6 >= matmul_flops


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_gradients_match_autodiff_of_a_plain_scan(reverse):
  lstm = layers.LSTM(5, 6, rngs=nnx.Rngs(0), reverse=reverse)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 5)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, 6)), jnp.float32)

  def plain(w_ih, b, w_hh, x):
    gx = jnp.swapaxes(x @ w_ih + b, 0, 1)
    gx = gx[::-1] if reverse else gx

    def step(carry, g):
      h, c = carry
      i, f, gg, o = jnp.split(g + h @ w_hh, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    z = jnp.zeros((3, 6))
    hs = jax.lax.scan(step, (z, z), gx)[1]
    return jnp.swapaxes(hs[::-1] if reverse else hs, 0, 1)

  params = (lstm.input_proj.kernel[...], lstm.input_proj.bias[...], lstm.hidden_proj.kernel[...])
  graphdef, state = nnx.split(lstm)
  ours = jax.grad(lambda s, x: (nnx.merge(graphdef, s)(x) * w).sum(), argnums=(0, 1))(state, x)
  ref = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=(0, 1, 2, 3))(*params, x)
  np.testing.assert_allclose(ours[0]["input_proj"]["kernel"][...], ref[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[0]["input_proj"]["bias"][...], ref[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[0]["hidden_proj"]["kernel"][...], ref[2], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[3], rtol=1e-4, atol=1e-5)


def test_the_benchmarks_flop_count_unrolls_both_lstm_loops():
  # XLA's cost analysis counts a loop body once; the training benchmark unrolls every scan
  # to count each step. The LSTM's forward loop passes its own unroll, which must not win.
  from benchmarks.common import unrolled_scans

  model = models.create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0), widths=(4, 4, 8, 8),
                              lstm_hidden=8, attention_size=8)
  model.eval()  # No BatchNorm statistics to update inside the traced loss.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    return nnx.merge(graphdef, params, rest)(x).sum()

  x = jnp.zeros((2, 48, 48, 1))
  grad = jax.jit(jax.grad(loss))
  assert grad.lower(params, x).as_text().count("stablehlo.while") == 2  # Forward and backward.
  with unrolled_scans():
    unrolled = jax.jit(jax.grad(loss)).lower(params, x)
  assert "stablehlo.while" not in unrolled.as_text()
