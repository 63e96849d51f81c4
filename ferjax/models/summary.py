"""Layer tables: output shapes, parameters and MFLOPs per image, computed by XLA.

FLOPs come from the compiled cost analysis of each layer (and of the whole
forward pass) at batch 1, in eval mode; a multiply-add counts as 2 FLOPs.
XLA counts a loop body once, so LSTMs are unrolled here to count every step.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ferjax.models import create_model
from ferjax.models.alstm import ConvTrunk
from ferjax.models.layers import LSTM, AdditiveAttention, ConvBlock, StackedLSTM

# Rows are these units (their insides are not listed) or leaf modules.
_UNITS = (ConvBlock, StackedLSTM, AdditiveAttention)
_SKIP = (nnx.Dropout,)


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One row of a layer table: a module's path, type, batch-1 output shape, parameters, MFLOPs."""

  path: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  mflops: float


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """A model's layer table and its totals, as :func:`summarize` computes them."""

  name: str
  rows: tuple[LayerRow, ...]
  params: int
  mflops: float  # Whole forward pass per image.

  def markdown(self) -> str:
    """The table as Markdown, with a bold total row."""
    lines = ["| layer | type | output | params | MFLOPs |", "| --- | --- | --- | ---: | ---: |"]
    for r in self.rows:
      shape = "×".join(map(str, r.output_shape[1:]))
      lines.append(f"| {r.path} | {r.kind} | {shape} | {r.params:,} | {r.mflops:.2f} |")
    lines.append(f"| **total** | | | **{self.params:,}** | **{self.mflops:.2f}** |")
    return "\n".join(lines)


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (``nnx.Param``; not BatchNorm statistics or RNG state)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_flops(fn, *args) -> float:
  """FLOPs of ``fn(*args)`` from XLA's cost analysis of the compiled function."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def _counting_model(name: str, num_classes: int, overrides: dict) -> tuple[nnx.Module, jax.Array]:
  """The registered model in eval mode with its LSTMs unrolled, and a batch-1 input."""
  model = create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0), **overrides)
  model.eval()
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LSTM):
      module.unroll = True
  return model, jnp.zeros((1, 48, 48, 1), jnp.float32)


def model_cost(name: str, num_classes: int = 7, **overrides) -> tuple[int, float]:
  """Parameters and MFLOPs per image of a registered model: :func:`summarize`'s totals.

  One compilation (the whole forward pass) instead of one per layer.
  """
  model, x = _counting_model(name, num_classes, overrides)
  return count_params(model), forward_flops(lambda m, a: m(a), model, x) / 1e6


def summarize(name: str, num_classes: int = 7, **overrides) -> ModelSummary:
  """The layer table of a registered model (eval mode, batch 1)."""
  model, x = _counting_model(name, num_classes, overrides)
  calls = _record_calls(model, x)
  paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model) if p}
  rows = []
  for module, inputs, output in calls:
    path = paths.get(id(module))
    if path is None or isinstance(module, _SKIP):
      continue
    if any(path.startswith(paths[id(u)] + "/") for u, _, _ in calls
           if isinstance(u, _UNITS) and id(u) in paths):
      continue  # Inside a unit that has its own row.
    if not isinstance(module, _UNITS) and any(
        p.startswith(path + "/") for p in (paths.get(id(m)) for m, _, _ in calls) if p):
      continue  # A container: its children have rows.
    flops = forward_flops(lambda m, a: m(a), module, inputs)
    rows.append(LayerRow(path, type(module).__name__, tuple(output.shape),
                         count_params(module), flops / 1e6))
  total = forward_flops(lambda m, a: m(a), model, x)
  return ModelSummary(name, tuple(rows), count_params(model), total / 1e6)


def _record_calls(model: nnx.Module, x: jax.Array) -> list:
  """Runs the model once, recording (module, input, output) of every submodule call."""
  calls = []
  classes = {type(m) for _, m in nnx.iter_modules(model)} - {type(model), ConvTrunk}
  with contextlib.ExitStack() as stack:
    for cls in classes:
      original = cls.__call__

      def wrapped(self, *args, __original=original, **kwargs):
        out = __original(self, *args, **kwargs)
        calls.append((self, args[0], out))
        return out

      cls.__call__ = wrapped
      stack.callback(setattr, cls, "__call__", original)
    model(x)
  return calls
