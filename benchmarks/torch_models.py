"""PyTorch reference implementations of ferjax's models and training step, for benchmarks only.

Every registered ferjax model has a torch.nn twin with the same layers, widths
and parameter count, and ``TrainStep`` does the work of ``ferjax.train.Trainer``'s
step (standardise, augment, forward, smoothed cross-entropy, backward, clip,
AdamW). PyTorch is an optional extra (``pip install -e ".[bench]"``); nothing
in ``ferjax`` imports this module.

Differences from ferjax that remain (and why):

* LSTM biases: ``torch.nn.LSTM`` has two bias vectors per layer and direction
  (``b_ih`` and ``b_hh``, 4H each) where ferjax has one. ``b_hh`` is kept at
  zero and frozen (``requires_grad=False``), so the gates and the trainable
  parameters are exactly ferjax's while the fused LSTM kernel is still used;
  ``model.parameters()`` lists 4H more entries per layer and direction
  (:func:`frozen_param_count`).
* BatchNorm running variance: PyTorch updates it with the unbiased batch
  variance, Flax with the biased one (the normalisation itself is the same,
  up to rounding: Flax computes the variance as E[x^2] - E[x]^2); the running
  statistic differs by a factor n/(n-1), n = B*h*w (2,304 or more at batch 64).
* Random numbers: augmentation and dropout draw from the same distributions as
  ferjax but from PyTorch's generator, so the draws themselves differ.
* Gradient clipping: ``clip_grad_norm_`` divides by ``norm + 1e-6``, optax by
  ``norm``.

The models take NCHW tensors in either memory layout (the benchmark uses
``channels_last``); the trunk's map is read row-major either way, and the DNN
flattens in (h, w, c) order like ferjax, so weights map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferjax.augment import AugmentConfig
from ferjax.config import TrainConfig
from ferjax.errors import ConfigError
from ferjax.models import model_options
from ferjax.preprocess import PIXEL_MEAN, PIXEL_STD

# The constant that turns a truncated normal's stddev into that of the
# untruncated one, as in jax.nn.initializers.variance_scaling.
_TRUNC_STD = 0.87962566103423978


def _variance_scaling_(w: torch.Tensor, scale: float, fan_in: int) -> None:
  """In-place truncated-normal fan-in init, the distribution of ferjax's he/lecun_normal."""
  std = math.sqrt(scale / fan_in) / _TRUNC_STD
  nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


def _linear(in_features: int, out_features: int, scale: float = 1.0, bias: bool = True
            ) -> nn.Linear:
  """nn.Linear with flax's default init (lecun normal, zero bias); scale=2 gives he normal."""
  layer = nn.Linear(in_features, out_features, bias=bias)
  with torch.no_grad():
    _variance_scaling_(layer.weight, scale, in_features)
    if bias:
      layer.bias.zero_()
  return layer


def _conv(in_features: int, out_features: int, kernel_size: int, bias: bool) -> nn.Conv2d:
  """A stride-1 SAME convolution with ferjax's he-normal init."""
  conv = nn.Conv2d(in_features, out_features, kernel_size, padding="same", bias=bias)
  with torch.no_grad():
    _variance_scaling_(conv.weight, 2.0, in_features * kernel_size * kernel_size)
    if bias:
      conv.bias.zero_()
  return conv


def max_pool_same(x: torch.Tensor, window: int = 3, stride: int = 2) -> torch.Tensor:
  """Max pooling with TensorFlow's SAME padding (extra padding row/column at the end)."""
  h, w = x.shape[-2:]
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h = max((out_h - 1) * stride + window - h, 0)
  pad_w = max((out_w - 1) * stride + window - w, 0)
  # max_pool2d's own padding is symmetric; SAME puts the odd row/column last.
  x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
            value=-math.inf)
  return F.max_pool2d(x, window, stride)


def tf_local_response_norm(depth_radius: int = 4, bias: float = 1.0, alpha: float = 0.001 / 9.0,
                           beta: float = 0.75) -> nn.LocalResponseNorm:
  """TensorFlow-semantics LRN (ferjax's defaults) as torch's LocalResponseNorm.

  TF computes ``x / (bias + alpha * sum x_j**2) ** beta``; torch divides alpha
  by the window size, so it gets ``alpha * size`` to compute the same thing.
  """
  size = 2 * depth_radius + 1
  return nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=bias)


class DNN(nn.Module):
  """The seed's baseline CNN: conv5x5, pool, LRN, conv3x3, LRN, pool, fc384, fc192, fc."""

  def __init__(self, num_classes: int = 7, *, width: int = 64,
               fc_sizes: tuple[int, int] = (384, 192), dropout: float = 0.5,
               image_size: int = 48):
    super().__init__()
    self.conv1 = _conv(1, width, 5, bias=True)
    self.norm1 = tf_local_response_norm()
    self.conv2 = _conv(width, width, 3, bias=True)
    self.norm2 = tf_local_response_norm()
    half = -(-image_size // 2)  # Each SAME pool with stride 2 rounds up.
    pooled = -(-half // 2)
    self.fc1 = _linear(pooled * pooled * width, fc_sizes[0], scale=2.0)
    self.fc2 = _linear(fc_sizes[0], fc_sizes[1])
    self.dropout = nn.Dropout(dropout)
    self.classifier = _linear(fc_sizes[1], num_classes)

  def forward(self, x_Bx1xHxW: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.conv1(x_Bx1xHxW))
    x = self.norm1(max_pool_same(x))
    x = F.relu(self.conv2(x))
    x = max_pool_same(self.norm2(x))
    # (h, w, c) order, as ferjax flattens NHWC: fc1's weight maps one to one.
    x = x.permute(0, 2, 3, 1).flatten(1)
    x = self.dropout(F.relu(self.fc1(x)))
    x = self.fc2(x)  # Linear, as in ferjax.
    return self.classifier(x)


class ConvBlock(nn.Module):
  """3x3 convolution (+ BatchNorm) + ReLU."""

  def __init__(self, in_features: int, out_features: int, *, batch_norm: bool):
    super().__init__()
    self.conv = _conv(in_features, out_features, 3, bias=not batch_norm)
    # Flax momentum 0.9 keeps 90 % of the old statistic; torch's 0.1 is the same update.
    self.norm = nn.BatchNorm2d(out_features, eps=1e-5, momentum=0.1) if batch_norm else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    return F.relu(x)


class ConvTrunk(nn.Module):
  """3x3 conv blocks with 2x2 max pooling after the blocks listed in ``pool_after``."""

  def __init__(self, widths: Sequence[int], pool_after: Sequence[int], *, batch_norm: bool,
               in_features: int = 1):
    super().__init__()
    bad = [i for i in pool_after if not 0 <= i < len(widths)]
    if bad:
      raise ValueError(f"pool_after {tuple(pool_after)} names blocks outside 0..{len(widths) - 1}")
    self.blocks = nn.ModuleList([
        ConvBlock(in_features if i == 0 else widths[i - 1], w, batch_norm=batch_norm)
        for i, w in enumerate(widths)])
    self.pool_after = tuple(pool_after)
    self.out_features = widths[-1]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i in self.pool_after:
        x = F.max_pool2d(x, 2)  # VALID: an odd last row/column is dropped, as in ferjax.
    return x


class AdditiveAttention(nn.Module):
  """Soft attention over a sequence: ``score_t = u . tanh(W x_t + b)``, softmax over t."""

  def __init__(self, in_features: int, attention_size: int):
    super().__init__()
    self.proj = _linear(in_features, attention_size)
    self.query = nn.Parameter(torch.randn(attention_size) / math.sqrt(attention_size))

  def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
    """Returns the attention weights ``(B, T)``."""
    return torch.softmax(torch.tanh(self.proj(x_BxTxD)) @ self.query, dim=-1)


def _lstm(in_features: int, hidden_size: int, num_layers: int, bidirectional: bool,
          dropout: float) -> nn.LSTM:
  """torch.nn.LSTM initialised like ferjax's, with ``b_hh`` zero and frozen (one bias)."""
  lstm = nn.LSTM(in_features, hidden_size, num_layers, batch_first=True,
                 bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
  h = hidden_size
  with torch.no_grad():
    for name, p in lstm.named_parameters():
      if name.startswith("weight_ih"):
        nn.init.xavier_uniform_(p)
      elif name.startswith("weight_hh"):
        nn.init.orthogonal_(p)
      elif name.startswith("bias_ih"):
        p.zero_()
        p[h:2 * h] = 1.0  # Gate order i, f, g, o, as in ferjax: forget bias 1.
      else:  # bias_hh: ferjax has a single bias, so this one stays 0.
        p.zero_()
        p.requires_grad_(False)
  return lstm


class AttentionLSTM(nn.Module):
  """CNN trunk → (local attention) → LSTM over the h*w positions → (global attention)."""

  def __init__(self, num_classes: int = 7, *, widths: Sequence[int] = (32, 64, 128, 128),
               pool_after: Sequence[int] = (0, 1, 3), batch_norm: bool = True,
               local_attention: bool = True, global_attention: bool = True,
               lstm_hidden: int = 128, lstm_layers: int = 1, bidirectional: bool = False,
               dropout: float = 0.5, attention_size: int = 128):
    super().__init__()
    if lstm_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {lstm_layers}")
    self.trunk = ConvTrunk(widths, pool_after, batch_norm=batch_norm)
    d = self.trunk.out_features
    self.local_attention = AdditiveAttention(d, attention_size) if local_attention else None
    self.lstm = _lstm(d, lstm_hidden, lstm_layers, bidirectional, dropout)
    self.bidirectional = bidirectional
    out = lstm_hidden * (2 if bidirectional else 1)
    self.global_attention = AdditiveAttention(out, attention_size) if global_attention else None
    self.dropout = nn.Dropout(dropout)
    self.classifier = _linear(out, num_classes)

  def forward(self, x_Bx1xHxW: torch.Tensor) -> torch.Tensor:
    fmap_BxDxhxw = self.trunk(x_Bx1xHxW)
    b, d, h, w = fmap_BxDxhxw.shape
    # Position n = row * w + col; a view when the map is channels_last.
    feats_BxNxD = fmap_BxDxhxw.permute(0, 2, 3, 1).reshape(b, h * w, d)
    if self.local_attention is not None:
      alpha_BxN = self.local_attention(feats_BxNxD)
      feats_BxNxD = feats_BxNxD * (h * w * alpha_BxN).unsqueeze(-1)
    h_BxTxH, _ = self.lstm(feats_BxNxD)
    if self.global_attention is not None:
      beta_BxT = self.global_attention(h_BxTxH)
      context_BxH = torch.einsum("bt,bth->bh", beta_BxT, h_BxTxH)
    elif self.bidirectional:  # Forward direction ends at step T, backward at step 1.
      half = h_BxTxH.shape[-1] // 2
      context_BxH = torch.cat([h_BxTxH[:, -1, :half], h_BxTxH[:, 0, half:]], dim=-1)
    else:
      context_BxH = h_BxTxH[:, -1]
    return self.classifier(self.dropout(context_BxH))


def build(name: str, num_classes: int = 7, **overrides) -> nn.Module:
  """The PyTorch twin of ``ferjax.models.create_model(name, ...)``.

  Options and their defaults come from ferjax's registry, so the two cannot
  drift apart; ``overrides`` takes the same names (``widths``, ``lstm_hidden``,
  ``width``, ...).

  Raises:
    ConfigError: unknown model or option.
  """
  options = model_options(name)  # Raises ConfigError for an unknown name.
  unknown = sorted(set(overrides) - set(options))
  if unknown:
    raise ConfigError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
                      f"its options are {', '.join(sorted(options))}")
  options.update(overrides)
  cls = DNN if name == "dnn" else AttentionLSTM
  return cls(num_classes, **options)


def count_params(model: nn.Module) -> int:
  """Trainable parameters: what ferjax's ``count_params`` counts for the same model."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_param_count(model: nn.Module) -> int:
  """Parameters that never train: the zero ``b_hh`` of each LSTM layer and direction (4H each)."""
  return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def copy_from_ferjax(model: nn.Module, ferjax_model) -> None:
  """Copies a ferjax model's parameters and BatchNorm statistics into its PyTorch twin."""
  import numpy as np  # Local: only this helper touches JAX arrays.

  def t(value, transpose=None):
    a = np.asarray(value[...], np.float32)
    # A writable copy: JAX arrays are read-only, and torch.from_numpy warns on those.
    return torch.from_numpy(np.array(a if transpose is None else a.transpose(transpose)))

  def conv(dst: nn.Conv2d, src):
    dst.weight.copy_(t(src.kernel, (3, 2, 0, 1)))  # HWIO → OIHW.
    if src.bias is not None:
      dst.bias.copy_(t(src.bias))

  def linear(dst: nn.Linear, src):
    dst.weight.copy_(t(src.kernel, (1, 0)))  # (in, out) → (out, in).
    if src.bias is not None:
      dst.bias.copy_(t(src.bias))

  def attention(dst: AdditiveAttention, src):
    linear(dst.proj, src.proj)
    dst.query.copy_(t(src.query))

  with torch.no_grad():
    if isinstance(model, DNN):
      for name in ("conv1", "conv2"):
        conv(getattr(model, name), getattr(ferjax_model, name))
      for name in ("fc1", "fc2", "classifier"):
        linear(getattr(model, name), getattr(ferjax_model, name))
      return
    for dst, src in zip(model.trunk.blocks, ferjax_model.trunk.blocks, strict=True):
      conv(dst.conv, src.conv)
      if dst.norm is not None:
        dst.norm.weight.copy_(t(src.norm.scale))
        dst.norm.bias.copy_(t(src.norm.bias))
        dst.norm.running_mean.copy_(t(src.norm.mean))
        dst.norm.running_var.copy_(t(src.norm.var))
    if model.local_attention is not None:
      attention(model.local_attention, ferjax_model.local_attention)
    if model.global_attention is not None:
      attention(model.global_attention, ferjax_model.global_attention)
    linear(model.classifier, ferjax_model.classifier)
    directions = [("", ferjax_model.lstm.forward_layers)]
    if model.bidirectional:
      directions.append(("_reverse", ferjax_model.lstm.backward_layers))
    for suffix, layers in directions:
      for k, layer in enumerate(layers):
        getattr(model.lstm, f"weight_ih_l{k}{suffix}").copy_(t(layer.input_proj.kernel, (1, 0)))
        getattr(model.lstm, f"bias_ih_l{k}{suffix}").copy_(t(layer.input_proj.bias))
        getattr(model.lstm, f"weight_hh_l{k}{suffix}").copy_(t(layer.hidden_proj.kernel, (1, 0)))
        getattr(model.lstm, f"bias_hh_l{k}{suffix}").zero_()


# --- The training step -------------------------------------------------------------------------


def preprocess(images_Bx1xHxW: torch.Tensor) -> torch.Tensor:
  """uint8 faces → standardised float32, as ``ferjax.preprocess.preprocess``."""
  x = images_Bx1xHxW.to(torch.float32) * (1.0 / 255.0)
  return (x - PIXEL_MEAN) * (1.0 / PIXEL_STD)


def affine_warp(x_BxCxHxW: torch.Tensor, angle_B: torch.Tensor, scale_B: torch.Tensor,
                shift_Bx2: torch.Tensor, flip_B: torch.Tensor) -> torch.Tensor:
  """``ferjax.augment.affine_warp`` with affine_grid/grid_sample (bilinear, edge replication).

  ferjax maps each output pixel (y, x) back to the input through
  ``src = R(angle) (p - centre - shift) / scale`` (x mirrored when flipped).
  With ``align_corners=True`` the normalised coordinate is ``(p - c) / c``,
  c = (size - 1) / 2, so the same map is the 2x3 matrix below.
  """
  b, _, h, w = x_BxCxHxW.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  cos, sin = torch.cos(angle_B), torch.sin(angle_B)
  sign = 1.0 - 2.0 * flip_B.to(x_BxCxHxW.dtype)
  dy, dx = shift_Bx2[:, 0], shift_Bx2[:, 1]
  inv_scale = 1.0 / scale_B
  row_u = (torch.stack([cos * cx, sin * cy, -(cos * dx + sin * dy)], dim=-1)
           * (sign * inv_scale / cx)[:, None])
  row_v = (torch.stack([-sin * cx, cos * cy, sin * dx - cos * dy], dim=-1)
           * (inv_scale / cy)[:, None])
  theta_Bx2x3 = torch.stack([row_u, row_v], dim=1)
  grid = F.affine_grid(theta_Bx2x3, [b, 1, h, w], align_corners=True)
  return F.grid_sample(x_BxCxHxW, grid, mode="bilinear", padding_mode="border",
                       align_corners=True)


def augment(x_BxCxHxW: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
  """Random shift, flip, rotation and scale per image, from ``ferjax.augment``'s distributions."""
  if config.erase_prob > 0:
    raise NotImplementedError("random erasing is not in the PyTorch reference")
  if not config.warps:
    return x_BxCxHxW
  b = x_BxCxHxW.shape[0]

  def uniform(*shape):  # In [-1, 1).
    return torch.rand(*shape, generator=generator) * 2.0 - 1.0

  shift_Bx2 = uniform(b, 2) * config.max_shift
  flip_B = (torch.rand(b, generator=generator) < 0.5 if config.flip
            else torch.zeros(b, dtype=torch.bool))
  angle_B = uniform(b) * math.radians(config.max_rotation)
  scale_B = 1.0 + uniform(b) * config.max_scale
  return affine_warp(x_BxCxHxW, angle_B, scale_B, shift_Bx2, flip_B)


def warmup_cosine_lr(step: int, peak: float, warmup: int, total: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, peak * 1e-3) at ``step``."""
  end = peak * 1e-3
  if step < warmup:
    return peak * step / warmup
  span = max(total - warmup, 1)
  frac = min(step - warmup, span) / span
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class TrainStep:
  """One AdamW training step doing the work of ferjax's jitted ``Trainer.train_step``.

  uint8 → standardise → augment → forward → cross-entropy with label smoothing
  on logits → backward → global-norm clip → AdamW (weight decay on tensors
  with more than one dimension, as ferjax's mask), warm-up + cosine learning
  rate. Unweighted loss: the benchmark's ferjax step uses class weights of 1.
  """

  def __init__(self, model: nn.Module, config: TrainConfig, *, total_steps: int,
               steps_per_epoch: int, memory_format: torch.memory_format = torch.contiguous_format,
               seed: int = 0):
    if config.optimizer != "adamw":
      raise NotImplementedError(
          f"the PyTorch reference step has AdamW only, not {config.optimizer}")
    self.model = model.to(memory_format=memory_format)
    self.config = config
    self.memory_format = memory_format
    self.total_steps = total_steps
    self.warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    self.params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in self.params if p.ndim > 1]
    no_decay = [p for p in self.params if p.ndim <= 1]
    # fused=True: one fused CPU kernel per parameter group rather than a loop over tensors.
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
    self.generator = torch.Generator().manual_seed(seed)

  def __call__(self, images_Bx1xHxW: torch.Tensor, labels_B: torch.Tensor, step: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the (detached) loss and the number of correct predictions."""
    config = self.config
    lr = warmup_cosine_lr(step, config.learning_rate, self.warmup, self.total_steps)
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    self.model.train()
    x = augment(preprocess(images_Bx1xHxW), config.augment, self.generator)
    x = x.contiguous(memory_format=self.memory_format)
    logits = self.model(x)
    loss = F.cross_entropy(logits, labels_B, label_smoothing=config.label_smoothing)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
      nn.utils.clip_grad_norm_(self.params, config.grad_clip, foreach=True)
    self.optimizer.step()
    correct = (logits.detach().argmax(-1) == labels_B).sum()
    return loss.detach(), correct
