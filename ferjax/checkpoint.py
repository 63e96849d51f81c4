"""Orbax checkpoints of a run: the latest (for resuming) and the best (for use).

Each checkpoint holds the model state (parameters and BatchNorm statistics),
the optimiser state, the parameter EMA or the weight average (``swa_epochs``)
when used, and a JSON ``meta`` item with
the run's config, model name, label set and ferjax version, so evaluation and
inference rebuild the right model without the user repeating flags. States are
restored into abstract states from ``nnx.eval_shape``, as the Flax NNX guides
do.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ferjax.errors import CheckpointError, ConfigError, check_folder_path

BEST_METRIC = "eval_accuracy"


class CheckpointStore:
  """The checkpoints of one run under ``<workdir>/checkpoints``.

  Keeps the latest checkpoint and the one with the best ``eval_accuracy``;
  older ones are deleted as new ones arrive. Writes are atomic: a run killed
  while saving leaves the previous checkpoints intact.
  """

  def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: no checkpoints here")
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=1),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        create=not read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, *, model: Any, optimizer: Any | None, ema: Any | None, meta: dict,
           swa: Any | None = None, eval_accuracy: float | None = None) -> None:
    """Writes a checkpoint; ``eval_accuracy`` makes it a candidate for best.

    ``optimizer=None`` writes an inference-only checkpoint (it cannot resume).
    """
    items = {"model": ocp.args.StandardSave(model), "meta": ocp.args.JsonSave(meta)}
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardSave(optimizer)
    if ema is not None:
      items["ema"] = ocp.args.StandardSave(ema)
    if swa is not None:
      items["swa"] = ocp.args.StandardSave(swa)
    metrics = None if eval_accuracy is None else {BEST_METRIC: float(eval_accuracy)}
    # Ctrl-C in the middle lost the checkpoint and printed Orbax's background threads'
    # tracebacks as the interpreter shut down under them: it now waits for the write.
    with _ctrl_c_deferred():
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
      self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    """The newest saved step (None if there is none)."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best eval accuracy (None if no evaluated checkpoint)."""
    if not any(info.metrics for info in self._manager._checkpoints):  # noqa: SLF001
      return None
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    """Every step saved here."""
    return list(self._manager.all_steps())

  def resolve(self, which: str | int) -> int:
    """Turns ``best``, ``latest`` or a step number into a saved step."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"{self.directory}: no checkpoints here")
    if which == "latest":
      return self.latest_step()
    if which == "best":
      step = self.best_step()
      return self.latest_step() if step is None else step
    try:
      # A bool or a fractional number is no step: int() would turn 1.5 (or True) into 1.
      if isinstance(which, bool) or (isinstance(which, numbers.Real) and which != int(which)):
        raise TypeError
      step = int(which)
    except (TypeError, ValueError, OverflowError):  # TypeError: None or a list, as from a call.
      # In evaluate and export_weights --checkpoint is the earlier name of --which, while
      # elsewhere it names the run: a folder here was meant for --workdir.
      hint = ("; that is a folder: name the run with --workdir"
              if isinstance(which, (str, os.PathLike)) and os.path.isdir(which) else "")
      raise CheckpointError(f"which checkpoint (--which): expected best, latest or a step "
                            f"number, got {which!r}{hint}") from None
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no checkpoint at step {step}; "
                            f"saved steps: {', '.join(map(str, sorted(steps)))}")
    return step

  def read_meta(self, step: int) -> dict:
    """The JSON ``meta`` item saved with ``step``; CheckpointError if it cannot be read."""
    try:
      restored = self._manager.restore(step,
                                       args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception as e:  # Orbax's errors for missing or damaged files have no common type.
      raise _unreadable(self.directory, step, e) from None

  def restore(self, step: int, **abstract: Any) -> dict[str, Any]:
    """Restores the named items (``model=``, ``optimizer=``, ``ema=``, ``swa=``) at ``step``.

    Each keyword gives the abstract state (from ``nnx.eval_shape``) to restore
    into; its shardings decide where the arrays land.
    """
    items = {name: ocp.args.StandardRestore(_with_shardings(tree))
             for name, tree in abstract.items()}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      if re.match(r"[A-Z_]+: ", str(e)):  # A TensorStore status (NOT_FOUND: ...): a file is bad.
        raise _unreadable(self.directory, step, e) from None
      missing = re.search(r'Item "(\w+)" was not found in the checkpoint', str(e))
      if missing:  # A folder of the checkpoint removed, or an inference-only export resumed.
        held = sorted(name for name in os.listdir(os.path.join(self.directory, str(step)))
                      if os.path.isdir(os.path.join(self.directory, str(step), name)))
        raise CheckpointError(f"{self.directory}/{step}: has no {missing.group(1)!r} item "
                              f"(it holds {', '.join(held)})") from None
      raise CheckpointError(
          f"{self.directory}/{step}: the checkpoint does not match the model it is loaded "
          f"into ({str(e).splitlines()[0][:300]})") from None
    except Exception as e:  # Orbax/TensorStore: a file of the checkpoint missing or damaged.
      raise _unreadable(self.directory, step, e) from None
    return {name: restored[name] for name in abstract}

  def close(self) -> None:
    """Releases the Orbax manager."""
    self._manager.close()


@contextlib.contextmanager
def _ctrl_c_deferred():
  """Holds a Ctrl-C (SIGINT) back until the block ends, then raises KeyboardInterrupt.

  Only where Python's own handler is installed, on the main thread; a program's own
  handler is left to do as it does.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  caught = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if caught:
    raise KeyboardInterrupt


def _unreadable(directory: str, step: int, e: Exception) -> CheckpointError:
  first = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0][:300]
  return CheckpointError(f"{directory}/{step}: cannot read the checkpoint; is it damaged or "
                         f"incomplete? ({type(e).__name__}: {first})")


def _with_shardings(tree: Any) -> Any:
  """Gives abstract leaves without a sharding the default device's."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def fix(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree.map(fix, tree)


def find_checkpoints(path: str | os.PathLike) -> str:
  """Accepts a workdir or its ``checkpoints/`` folder; returns the latter."""
  given = os.fspath(path)
  path = os.path.abspath(given)
  if not os.path.exists(path):
    # realtime's and attention_maps' --checkpoint is the earlier name of --workdir, while
    # evaluate's is --which: a checkpoint's name here was meant for --which.
    hint = ("; best, latest or a step number picks a checkpoint with --which (in realtime "
            "and attention_maps --checkpoint names the run)"
            if given in ("best", "latest") or given.isdigit() else "")
    raise CheckpointError(f"{path}: no such directory{hint}")
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":  # One step's own folder.
    raise CheckpointError(f"{path} is one checkpoint (step {name}); name its run, "
                          f"{os.path.dirname(parent)}, and the step with --which={name}")
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def run_folder(path: str | os.PathLike) -> str:
  """The run folder of a workdir or its ``checkpoints/`` (where its reports and results go)."""
  checkpoints = find_checkpoints(path)
  return (os.path.dirname(checkpoints) if os.path.basename(checkpoints) == "checkpoints"
          else checkpoints)


def load_model(path: str | os.PathLike, which: str | int = "best", *,
               expect_model: str | None = None):
  """Rebuilds a trained model in eval mode from a run's checkpoint.

  The model name, its options and the label set come from the checkpoint, so
  nothing has to be repeated. Parameters are replaced by their EMA when the run
  kept one.

  Args:
    path: a workdir, or its ``checkpoints/`` folder.
    which: ``best``, ``latest`` or a step number.
    expect_model: if given, the checkpoint must be of this model.

  Returns:
    ``(model, meta)``: the model in eval mode and the checkpoint's meta dict
    (config, model, labels, class_names, num_classes, ferjax_version, step).

  Raises:
    CheckpointError: no such checkpoint, or it does not fit the model.
  """
  from flax import nnx

  from ferjax.models import create_model  # Here: keeps checkpoint free of model imports.

  store = CheckpointStore(find_checkpoints(path), read_only=True)
  try:
    step = store.resolve(which)
    meta = store.read_meta(step)
    if expect_model is not None and meta["model"] != expect_model:
      raise CheckpointError(f"{store.directory}/{step} holds the model {meta['model']!r}, "
                            f"not {expect_model!r}")
    config = meta["config"]
    # The model's structure only: initialising its parameters would cost dozens of
    # small compiles (seconds) for values the checkpoint replaces.
    abstract_model = nnx.eval_shape(lambda: create_model(
        meta["model"], num_classes=meta["num_classes"], rngs=nnx.Rngs(0),
        **config.get("model_overrides", {})))
    graphdef, abstract, abstract_rngs = nnx.split(abstract_model, nnx.Not(nnx.RngState),
                                                  nnx.RngState)
    items = {"model": abstract}
    if config.get("ema_decay"):
      items["ema"] = nnx.state(abstract_model, nnx.Param)
    restored = store.restore(step, **items)
  finally:
    store.close()
  # Dropout's random streams are not checkpointed; evaluation never draws from them.
  model = nnx.merge(graphdef, restored["model"], jax.tree.map(_fresh_rng_leaf, abstract_rngs))
  if "ema" in restored:
    nnx.update(model, restored["ema"])
  model.eval()
  return model, {**meta, "step": step}


def load_other_run(source: str, workdir: str, flag: str, own_run: str):
  """``load_model(source, "best")`` for a training run's ``flag`` that names another run.

  Errors name the flag; ``own_run`` ends the message when ``source`` is the run's own
  ``workdir``.
  """
  if os.path.exists(source) and os.path.exists(workdir) and os.path.samefile(source, workdir):
    raise ConfigError(f"{flag}={source} is this run's own --workdir; {own_run}")
  try:
    return load_model(source, "best")
  except CheckpointError as e:
    raise CheckpointError(f"{flag}: {e}") from None


def _fresh_rng_leaf(x: jax.ShapeDtypeStruct) -> jax.Array:
  """A concrete value for an abstract RNG key or counter."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return key if x.shape == () else jax.random.split(key, x.shape)
  return jax.numpy.zeros(x.shape, x.dtype)


def export_model(path: str | os.PathLike, output: str | os.PathLike, which: str | int = "best"
                 ) -> dict:
  """Writes an inference-only copy of a run's checkpoint (no optimiser state).

  The EMA, if the run kept one, is folded into the parameters. The result is a
  folder with ``checkpoints/`` that :func:`load_model` and
  ``ferjax.inference.Predictor`` read like a workdir; this is how the default
  weights shipped in ``ferjax/weights/default`` are made.

  Args:
    path: the run's workdir (or its ``checkpoints/``).
    output: the folder to create; it must not exist yet.
    which: ``best``, ``latest`` or a step number.

  Returns:
    The meta dict written with it.
  """
  output = os.path.abspath(os.fspath(output))
  if os.path.exists(output):
    raise CheckpointError(f"{output} already exists; remove it or choose another --output")
  check_folder_path(output, "output")
  model, meta = load_model(path, which)
  meta = {**meta, "exported_from": {"path": os.fspath(path), "step": meta["step"]}}
  return save_inference_checkpoint(model, output, meta,
                                   eval_accuracy=meta.get("metrics", {}).get("eval_accuracy"))


def save_inference_checkpoint(model, output: str | os.PathLike, meta: dict, *,
                              eval_accuracy: float | None = None) -> dict:
  """Writes ``model`` (as :func:`load_model` returns it) to ``output/checkpoints``.

  No optimiser state, and no EMA: ``load_model`` has folded it into the
  parameters already, so the saved config says ``ema_decay`` 0. Returns the
  meta dict written with it (at ``meta["step"]``).
  """
  from flax import nnx

  meta = {**meta, "config": {**meta["config"], "ema_decay": 0.0}}
  store = CheckpointStore(os.path.join(os.fspath(output), "checkpoints"))
  try:
    store.save(meta["step"], model=nnx.state(model, nnx.Not(nnx.RngState)), optimizer=None,
               ema=None, meta=meta, eval_accuracy=eval_accuracy)
  finally:
    store.close()
  return meta
