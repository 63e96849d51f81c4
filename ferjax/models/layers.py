"""Building blocks shared by the FER models: pooling, LRN, LSTM and attention.

Pooling is written with reshapes and strided slices rather than
``lax.reduce_window``: the forward result is identical, and the gradient
becomes plain selects and pads that XLA fuses, instead of ``select_and_scatter``,
which is slow on CPU (see BUILD_NOTES.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

# He initialisation suits ReLU networks trained from scratch.
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def check_model_input(x_BxHxWxC: jax.Array, channels: int = 1, size: int | None = None) -> None:
  """Raises ValueError unless ``x`` is float ``(B, H, W, channels)`` model input.

  Catches two easy slips before they turn into wrong logits or an error from
  deep inside a convolution: uint8 faces passed without
  :func:`ferjax.preprocess.preprocess` (they would run, unstandardised, to
  meaningless logits), and faces without the batch or channel axis. With
  ``size``, H and W must both be ``size`` (a model with a fixed-size dense layer).
  """
  shape, dtype = jnp.shape(x_BxHxWxC), jnp.result_type(x_BxHxWxC)
  if len(shape) != 4 or shape[-1] != channels:
    raise ValueError(f"model input must be (B, H, W, {channels}), got shape {tuple(shape)}; "
                     f"add a batch axis for one face (x[None]) and a channel axis for grey "
                     f"(B, H, W) faces (x[..., None])")
  if size is not None and tuple(shape[1:3]) != (size, size):
    raise ValueError(f"model input must be (B, {size}, {size}, {channels}) for this model "
                     f"(image_size={size}), got shape {tuple(shape)}; resize the faces to "
                     f"{size}x{size}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"model input must be float, as ferjax.preprocess.preprocess returns, got "
                     f"{dtype}; call model(preprocess(faces_uint8))")


def _windows_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  b, h, w, c = x_BxHxWxC.shape
  return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  return _windows_2x2(x_BxHxWxC).max(axis=(2, 4))


def _max_pool_2x2_fwd(x_BxHxWxC):
  y = _max_pool_2x2(x_BxHxWxC)
  return y, (x_BxHxWxC, y)


def _max_pool_2x2_bwd(residuals, g_BxhxwxC):
  # The gradient goes to the first maximum of each window in row-major order,
  # exactly as lax.reduce_window's select_and_scatter does, but as one fused
  # elementwise pass instead of a scatter.
  x_BxHxWxC, y_BxhxwxC = residuals
  eq = _windows_2x2(x_BxHxWxC) == y_BxhxwxC[:, :, None, :, None, :]
  e00, e01, e10, e11 = eq[:, :, 0, :, 0], eq[:, :, 0, :, 1], eq[:, :, 1, :, 0], eq[:, :, 1, :, 1]
  zero = jnp.zeros_like(g_BxhxwxC)
  pick = lambda m: jnp.where(m, g_BxhxwxC, zero)
  top = jnp.stack([pick(e00), pick(e01 & ~e00)], axis=3)
  bottom = jnp.stack([pick(e10 & ~(e00 | e01)), pick(e11 & ~(e00 | e01 | e10))], axis=3)
  return (jnp.stack([top, bottom], axis=2).reshape(x_BxHxWxC.shape),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 (VALID: an odd last row or column is dropped)."""
  _, h, w, _ = x_BxHxWxC.shape
  return _max_pool_2x2(x_BxHxWxC[:, :h - h % 2, :w - w % 2])


def max_pool_same(x_BxHxWxC: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Max pooling with TensorFlow's SAME padding, as a maximum of strided slices."""
  _, h, w, _ = x_BxHxWxC.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h = max((out_h - 1) * stride + window - h, 0)
  pad_w = max((out_w - 1) * stride + window - w, 0)
  x = jnp.pad(x_BxHxWxC, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                          (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
              constant_values=-jnp.inf)
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  rows = x[:, 0:span_h:stride]
  for i in range(1, window):
    rows = jnp.maximum(rows, x[:, i:i + span_h:stride])
  out = rows[:, :, 0:span_w:stride]
  for j in range(1, window):
    out = jnp.maximum(out, rows[:, :, j:j + span_w:stride])
  return out


class LocalResponseNorm(nnx.Module):
  """Local response normalisation across channels with TensorFlow's semantics.

  ``out = x / (bias + alpha * sum_{|j-c| <= radius} x_j**2) ** beta``; like
  ``tf.nn.local_response_normalization``, alpha is *not* divided by the window
  size. The windowed sum is a matmul with a banded 0/1 matrix.
  """

  def __init__(self, depth_radius: int = 4, bias: float = 1.0, alpha: float = 0.001 / 9.0,
               beta: float = 0.75):
    self.depth_radius = depth_radius
    self.bias = bias
    self.alpha = alpha
    self.beta = beta

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    c = x_BxHxWxC.shape[-1]
    idx = jnp.arange(c)
    band_CxC = (jnp.abs(idx[:, None] - idx[None, :]) <= self.depth_radius).astype(x_BxHxWxC.dtype)
    sqr_sum = jnp.square(x_BxHxWxC) @ band_CxC
    return x_BxHxWxC * jnp.power(self.bias + self.alpha * sqr_sum, -self.beta)


class ConvBlock(nnx.Module):
  """3x3 convolution (+ BatchNorm) + ReLU."""

  def __init__(self, in_features: int, out_features: int, *, batch_norm: bool, rngs: nnx.Rngs,
               kernel_size: int = 3):
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding="SAME",
                         use_bias=not batch_norm, kernel_init=he_normal, rngs=rngs)
    self.norm = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs) if batch_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    return jax.nn.relu(x)


def _lstm_cell(gates_Bx4H, c_BxH):
  i, f, g, o = jnp.split(gates_Bx4H, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c_BxH = f * c_BxH + i * g
  return (i, f, g, o), c_BxH, o * jnp.tanh(c_BxH)


def _recurrence_fwd(gates_x_TxBx4H, w_hh_Hx4H, unroll):
  zeros_BxH = jnp.zeros((gates_x_TxBx4H.shape[1], w_hh_Hx4H.shape[0]), gates_x_TxBx4H.dtype)

  def step(carry, gates_x_Bx4H):
    h_BxH, c_BxH = carry
    acts, c_BxH, h_BxH = _lstm_cell(gates_x_Bx4H + h_BxH @ w_hh_Hx4H, c_BxH)
    return (h_BxH, c_BxH), (h_BxH, c_BxH, jnp.concatenate(acts, axis=-1))

  _, (h_TxBxH, c_TxBxH, acts_TxBx4H) = jax.lax.scan(
      step, (zeros_BxH, zeros_BxH), gates_x_TxBx4H, unroll=unroll)
  return h_TxBxH, (h_TxBxH, c_TxBxH, acts_TxBx4H, w_hh_Hx4H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lstm_recurrence(gates_x_TxBx4H: jax.Array, w_hh_Hx4H: jax.Array,
                    unroll: int | bool = 1) -> jax.Array:
  """Runs the LSTM recurrence over time-major input gates; returns every h ``(T, B, H)``.

  Gate order (input, forget, cell, output); zero initial state. The custom
  backward pass does only the truly sequential work inside its loop (the
  gate gradients and one ``(B, 4H) @ (4H, H)`` matmul per step) and computes
  the recurrent weight gradient as one matmul over all steps afterwards,
  instead of accumulating it step by step as autodiff of the scan does.
  ``unroll`` is passed to the forward ``lax.scan``.
  """
  return _recurrence_fwd(gates_x_TxBx4H, w_hh_Hx4H, unroll)[0]


def _recurrence_bwd(unroll, residuals, dh_TxBxH):
  del unroll
  h_TxBxH, c_TxBxH, acts_TxBx4H, w_hh_Hx4H = residuals
  c_prev_TxBxH = jnp.concatenate([jnp.zeros_like(c_TxBxH[:1]), c_TxBxH[:-1]])
  w_4HxH = w_hh_Hx4H.T

  def step(carry, xs):
    dh_next_BxH, dc_next_BxH = carry
    dh_out_BxH, c_BxH, c_prev_BxH, acts_Bx4H = xs
    i, f, g, o = jnp.split(acts_Bx4H, 4, axis=-1)
    dh_BxH = dh_out_BxH + dh_next_BxH
    tanh_c_BxH = jnp.tanh(c_BxH)
    dc_BxH = dc_next_BxH + dh_BxH * o * (1 - tanh_c_BxH * tanh_c_BxH)
    dgates_Bx4H = jnp.concatenate(
        [dc_BxH * g * i * (1 - i), dc_BxH * c_prev_BxH * f * (1 - f),
         dc_BxH * i * (1 - g * g), dh_BxH * tanh_c_BxH * o * (1 - o)], axis=-1)
    return (dgates_Bx4H @ w_4HxH, dc_BxH * f), dgates_Bx4H

  zeros_BxH = jnp.zeros_like(dh_TxBxH[0])
  _, dgates_TxBx4H = jax.lax.scan(step, (zeros_BxH, zeros_BxH),
                                  (dh_TxBxH, c_TxBxH, c_prev_TxBxH, acts_TxBx4H), reverse=True)
  h_prev_TxBxH = jnp.concatenate([jnp.zeros_like(h_TxBxH[:1]), h_TxBxH[:-1]])
  dw_hh_Hx4H = jnp.einsum("tbh,tbg->hg", h_prev_TxBxH, dgates_TxBx4H)
  return dgates_TxBx4H, dw_hh_Hx4H


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class LSTM(nnx.Module):
  """A single-direction LSTM layer that returns the hidden state of every step.

  The input projection of all steps is one matmul; only the recurrent matmul
  runs inside the loop over time (:func:`lstm_recurrence`). Gate order: input,
  forget, cell, output; the forget-gate bias starts at 1.
  """

  def __init__(self, in_features: int, hidden_size: int, *, rngs: nnx.Rngs, reverse: bool = False):
    self.hidden_size = hidden_size
    self.reverse = reverse
    # Steps per loop iteration of the forward scan. XLA's cost analysis counts a
    # loop body once, so ferjax.models.summary unrolls fully to count every step.
    self.unroll: int | bool = 1
    bias = jnp.zeros((4 * hidden_size,)).at[hidden_size:2 * hidden_size].set(1.0)
    self.input_proj = nnx.Linear(in_features, 4 * hidden_size,
                                 kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.input_proj.bias[...] = bias
    self.hidden_proj = nnx.Linear(hidden_size, 4 * hidden_size, use_bias=False,
                                  kernel_init=nnx.initializers.orthogonal(), rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    gates_x_TxBx4H = jnp.swapaxes(self.input_proj(x_BxTxD), 0, 1)
    if self.reverse:
      gates_x_TxBx4H = gates_x_TxBx4H[::-1]
    h_TxBxH = lstm_recurrence(gates_x_TxBx4H, self.hidden_proj.kernel[...], self.unroll)
    if self.reverse:
      h_TxBxH = h_TxBxH[::-1]
    return jnp.swapaxes(h_TxBxH, 0, 1)


class StackedLSTM(nnx.Module):
  """One or more LSTM layers, optionally bidirectional, dropout between layers.

  Returns the outputs of the last layer for every step, ``(B, T, H * dirs)``.
  """

  def __init__(self, in_features: int, hidden_size: int, *, num_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.0, rngs: nnx.Rngs):
    if num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    self.bidirectional = bidirectional
    dirs = 2 if bidirectional else 1
    self.forward_layers = nnx.List([
        LSTM(in_features if i == 0 else hidden_size * dirs, hidden_size, rngs=rngs)
        for i in range(num_layers)])
    self.backward_layers = nnx.List([
        LSTM(in_features if i == 0 else hidden_size * dirs, hidden_size, reverse=True, rngs=rngs)
        for i in range(num_layers)] if bidirectional else [])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.output_size = hidden_size * dirs

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    for i, forward in enumerate(self.forward_layers):
      if i > 0:
        x_BxTxD = self.dropout(x_BxTxD)
      h_BxTxH = forward(x_BxTxD)
      if self.bidirectional:
        h_BxTxH = jnp.concatenate([h_BxTxH, self.backward_layers[i](x_BxTxD)], axis=-1)
      x_BxTxD = h_BxTxH
    return x_BxTxD

  def final_state(self, h_BxTxH: jax.Array) -> jax.Array:
    """Each direction's last hidden state: step T for forward, step 1 for backward."""
    if not self.bidirectional:
      return h_BxTxH[:, -1]
    half = h_BxTxH.shape[-1] // 2
    return jnp.concatenate([h_BxTxH[:, -1, :half], h_BxTxH[:, 0, half:]], axis=-1)


class AdditiveAttention(nnx.Module):
  """Soft attention over a sequence: ``score_t = u . tanh(W x_t + b)``, softmax over t.

  ``u`` is a learned query vector; the scores measure how well each element
  correlates with it.
  """

  def __init__(self, in_features: int, attention_size: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, attention_size, rngs=rngs)
    self.query = nnx.Param(
        jax.random.normal(rngs.params(), (attention_size,)) / math.sqrt(attention_size))

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    """Returns the attention weights ``(B, T)``, non-negative and summing to 1."""
    scores_BxT = jnp.tanh(self.proj(x_BxTxD)) @ self.query[...]
    return jax.nn.softmax(scores_BxT, axis=-1)
