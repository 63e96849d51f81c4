"""CNN-LSTM models with optional local and global attention (Ye, Hu, Liu, CIN 2022).

Our reconstruction of the two-layer attention CNN-LSTM from the paper's title
and the seed project's five parts (the paper's body was not available):

  CNN local features → local feature attention → LSTM global feature
  learning → global feature attention → classification.

A conv trunk turns a 48x48 face into a 6x6 map; its 36 local feature vectors,
read row-major, are the LSTM's sequence (the seed flattened the map into a
sequence of length 1, so its LSTM and attention did nothing).

* local attention: ``alpha_n = softmax_n(v . tanh(W f_n + b))`` over the 36
  positions; the features are re-weighted to ``36 * alpha_n * f_n`` so uniform
  attention leaves them unchanged.
* global attention: ``beta_t = softmax_t(u . tanh(W' h_t + b'))`` over the LSTM
  steps; the classifier reads ``sum_t beta_t h_t``.
* without global attention the classifier reads the LSTM's final state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ferjax.models.layers import (AdditiveAttention, ConvBlock, StackedLSTM, check_model_input,
                                  max_pool_2x2)


class ConvTrunk(nnx.Module):
  """3x3 conv blocks with 2x2 max pooling after the blocks listed in ``pool_after``."""

  def __init__(self, widths: Sequence[int], pool_after: Sequence[int], *, batch_norm: bool,
               rngs: nnx.Rngs, in_features: int = 1):
    bad = [i for i in pool_after if not 0 <= i < len(widths)]
    if bad:
      raise ValueError(f"pool_after {tuple(pool_after)} names blocks outside 0..{len(widths) - 1}")
    self.blocks = nnx.List([
        ConvBlock(in_features if i == 0 else widths[i - 1], w, batch_norm=batch_norm, rngs=rngs)
        for i, w in enumerate(widths)])
    self.pool_after = tuple(pool_after)
    self.out_features = widths[-1]

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    for i, block in enumerate(self.blocks):
      x_BxHxWxC = block(x_BxHxWxC)
      if i in self.pool_after:
        x_BxHxWxC = max_pool_2x2(x_BxHxWxC)
    return x_BxHxWxC


class AttentionLSTM(nnx.Module):
  """CNN trunk → (local attention) → LSTM over 36 positions → (global attention) → logits.

  ``cnn_lstm``, ``cnn_alstm`` and ``acnn_alstm`` are this class with the
  attentions switched off or on.
  """

  def __init__(self, num_classes: int = 7, *, rngs: nnx.Rngs,
               widths: Sequence[int] = (32, 64, 128, 128), pool_after: Sequence[int] = (0, 1, 3),
               batch_norm: bool = True, local_attention: bool = True,
               global_attention: bool = True, lstm_hidden: int = 128, lstm_layers: int = 1,
               bidirectional: bool = False, dropout: float = 0.5, attention_size: int = 128):
    self.trunk = ConvTrunk(widths, pool_after, batch_norm=batch_norm, rngs=rngs)
    d = self.trunk.out_features
    self.local_attention = (AdditiveAttention(d, attention_size, rngs=rngs)
                            if local_attention else None)
    self.lstm = StackedLSTM(d, lstm_hidden, num_layers=lstm_layers, bidirectional=bidirectional,
                            dropout=dropout, rngs=rngs)
    self.global_attention = (AdditiveAttention(self.lstm.output_size, attention_size, rngs=rngs)
                             if global_attention else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = nnx.Linear(self.lstm.output_size, num_classes, rngs=rngs)

  def forward(self, x_BxHxWx1: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns logits ``(B, C)`` and the attention weights.

    The dict holds ``alpha`` ``(B, N)`` over the N = h*w trunk positions (local
    attention) and ``beta`` ``(B, T)`` over the LSTM steps (global attention),
    for the attentions the model has.

    Raises:
      ValueError: input that is not float ``(B, H, W, 1)`` (e.g. uint8 faces
        not passed through :func:`ferjax.preprocess.preprocess`).
    """
    check_model_input(x_BxHxWx1)
    return self.head(self.trunk(x_BxHxWx1))

  def head(self, fmap_BxhxwxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Everything after the trunk: the sequence of local features to logits."""
    b, h, w, d = fmap_BxhxwxD.shape
    feats_BxNxD = fmap_BxhxwxD.reshape(b, h * w, d)  # Row-major: position n = row * w + col.
    aux = {}
    if self.local_attention is not None:
      alpha_BxN = self.local_attention(feats_BxNxD)
      feats_BxNxD = feats_BxNxD * (h * w * alpha_BxN)[..., None]
      aux["alpha"] = alpha_BxN
    h_BxTxH = self.lstm(feats_BxNxD)
    if self.global_attention is not None:
      beta_BxT = self.global_attention(h_BxTxH)
      context_BxH = jnp.einsum("bt,bth->bh", beta_BxT, h_BxTxH)
      aux["beta"] = beta_BxT
    else:
      context_BxH = self.lstm.final_state(h_BxTxH)
    return self.classifier(self.dropout(context_BxH)), aux

  def __call__(self, x_BxHxWx1: jax.Array) -> jax.Array:
    return self.forward(x_BxHxWx1)[0]
