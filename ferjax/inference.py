"""Inference from a trained checkpoint: a jitted, fixed-shape predictor for face crops."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from ferjax import checkpoint as checkpoint_lib
from ferjax.errors import CheckpointError, ConfigError, is_whole
from ferjax.faces import FACE_SIZE
from ferjax.models import check_model
from ferjax.preprocess import preprocess

log = logging.getLogger(__name__)

# Weights shipped inside the package: a workdir-like folder holding checkpoints/.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "default")


def default_weights_dir() -> str:
  """The shipped default weights' folder.

  Raises:
    CheckpointError: the package ships no default weights.
  """
  if not os.path.isdir(os.path.join(DEFAULT_WEIGHTS, "checkpoints")):
    raise CheckpointError(
        f"{DEFAULT_WEIGHTS}: no default weights are installed with ferjax; pass a training "
        "run's workdir instead (e.g. --workdir=runs/acnn_alstm), or train one with "
        "python -m experiments.train")
  return DEFAULT_WEIGHTS


def default_batch_sizes(max_faces: int) -> tuple[int, ...]:
  """Powers of two below ``max_faces``, then ``max_faces``: (1, 2, 4, 8) for 8."""
  sizes = [1 << i for i in range(max_faces.bit_length()) if 1 << i < max_faces]
  return tuple(sizes + [max_faces])


class Predictor:
  """Class probabilities for 48x48 face crops, from one trained model in eval mode.

  The model's state is split out once and compiled into a ``jax.jit`` pure
  function, its weights as constants (cheaper per call than ``nnx.jit``, or
  than passing the weights as arguments, for a model this small); the
  predictor keeps a copy and does not follow later changes to the model.
  Crops are zero-padded to one of a few fixed batch sizes, (1, 2, 4, 8) by
  default, each compiled once by :meth:`warmup` (which
  :func:`ferjax.video.analyze_video` and :func:`ferjax.video.run_pipeline`
  call; call it before your own loop of :meth:`predict_faces` or
  :func:`ferjax.video.analyze_frame`): after it the number of faces in a frame
  never causes a compile, and one face does not pay for eight (the model's cost
  grows about linearly with the batch; see BUILD_NOTES.md).
  ``batch_sizes=(max_faces,)`` gives a single compiled shape.
  Crops go through :func:`ferjax.preprocess.preprocess`, as in training.

  Attributes:
    class_names: the label of each probability column.
    meta: the checkpoint's meta dict (model, config, labels, step, ...), or {}.
    checkpoint: the checkpoint folder it was loaded from (None for from_model).
    max_faces: the largest batch; more faces run in several calls.
    batch_sizes: the compiled batch sizes, ascending, ending in ``max_faces``.
    attention_keys: the attention weights the model returns, sorted: ``alpha``
      (local), ``beta`` (global), both or neither.
    trace_count: how many times the predict function was traced, i.e. compiled
      (at most ``len(batch_sizes)``).
    compile_seconds: the time :meth:`warmup` took (None before it ran).
  """

  def __init__(self, checkpoint: str | os.PathLike | None = None, which: str | int = "best", *,
               max_faces: int = 8, batch_sizes: Sequence[int] | None = None):
    """Loads a checkpoint.

    Args:
      checkpoint: a training run's workdir (or its ``checkpoints/``); None uses
        the default weights shipped in ``ferjax/weights/default``.
      which: ``best``, ``latest`` or a step number.
      max_faces: the largest batch of the compiled predict function.
      batch_sizes: the padded batch sizes to compile; default
        :func:`default_batch_sizes` of ``max_faces``.

    Raises:
      CheckpointError: no such checkpoint, or no shipped default weights.
    """
    path = default_weights_dir() if checkpoint is None else os.fspath(checkpoint)
    model, meta = checkpoint_lib.load_model(path, which)
    self._setup(model, meta["class_names"], max_faces, batch_sizes, meta)
    self.checkpoint = path

  @classmethod
  def from_model(cls, model: nnx.Module, class_names: Sequence[str], *, max_faces: int = 8,
                 batch_sizes: Sequence[int] | None = None) -> Predictor:
    """Wraps a model already in memory (it is switched to eval mode).

    Raises:
      ConfigError: ``model`` is not a model (e.g. the ``(model, meta)`` pair
        :func:`ferjax.checkpoint.load_model` returns), ``class_names`` is not a
        sequence of names, or bad ``max_faces`` / ``batch_sizes``.
    """
    check_model(model)
    # One string would pass as a sequence of one-letter names (and a 7-letter one fit 7 classes).
    if (isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__")
        or not all(isinstance(n, str) for n in class_names)):
      raise ConfigError(f"class_names must be a sequence of names, one per class, e.g. "
                        f"meta['class_names'] from load_model, got {class_names!r}")
    self = cls.__new__(cls)
    self._setup(model, class_names, max_faces, batch_sizes, {})
    self.checkpoint = None
    return self

  def _setup(self, model: nnx.Module, class_names: Sequence[str], max_faces: int,
             batch_sizes: Sequence[int] | None, meta: dict) -> None:
    # Whole numbers checked here: a float would fail later, inside warmup or the first
    # predict_faces, as a TypeError from numpy.
    if not is_whole(max_faces, 1):
      raise ConfigError(f"max_faces must be a whole number of at least 1, got {max_faces!r}")
    max_faces = int(max_faces)
    if batch_sizes is not None and (isinstance(batch_sizes, (str, bytes))
                                    or not hasattr(batch_sizes, "__iter__")):
      raise ConfigError(f"batch_sizes must be a sequence of whole numbers, e.g. (1, {max_faces}), "
                        f"got {batch_sizes!r}")
    if batch_sizes is not None and not all(is_whole(size) for size in batch_sizes):
      raise ConfigError(f"batch_sizes must be whole numbers, got {batch_sizes!r}")
    sizes = tuple(sorted(set(batch_sizes or default_batch_sizes(max_faces)) | {max_faces}))
    sizes = tuple(int(size) for size in sizes)
    if sizes[0] < 1 or sizes[-1] != max_faces:
      raise ConfigError(f"batch_sizes must lie in 1..max_faces={max_faces}, got {batch_sizes}")
    model.eval()  # Dropout off, BatchNorm on its running statistics.
    graphdef, state = nnx.split(model)
    # The weights go into each compiled function as constants, not arguments, so the
    # compiled code can treat them as fixed: the BatchNorm statistics fold away, and
    # YNNPACK, which runs the whole trunk at small batches, can prepare its convolution
    # weights once instead of per call. A one-face acnn_alstm predict took about 12 % less,
    # vgg_alstm about 25 % (BUILD_NOTES.md, Speed). Host copies of the arrays are what jit
    # embeds; random keys (dropout's, unused in eval mode) stay as they are.
    state = jax.tree.map(_as_constant, state)
    self.class_names = tuple(class_names)
    self.meta = dict(meta)
    self.max_faces = max_faces
    self.batch_sizes = sizes
    self.compile_seconds: float | None = None
    self.trace_count = 0

    def predict(images_Bx48x48x1):
      self.trace_count += 1  # Python side effect: runs only while tracing.
      model = nnx.merge(graphdef, state)
      x_Bx48x48x1 = preprocess(images_Bx48x48x1)
      if hasattr(model, "forward"):
        logits_BxC, aux = model.forward(x_Bx48x48x1)
      else:
        logits_BxC, aux = model(x_Bx48x48x1), {}
      return jax.nn.softmax(logits_BxC, axis=-1), aux

    spec = jax.ShapeDtypeStruct((1, FACE_SIZE, FACE_SIZE, 1), np.uint8)
    # Through a wrapper: eval_shape(predict) would fill jit(predict)'s trace cache and hide
    # a trace from trace_count.
    probs_shape, aux_shape = jax.eval_shape(lambda x: predict(x), spec)
    self.trace_count = 0
    if probs_shape.shape[-1] != len(self.class_names):
      raise CheckpointError(f"the model has {probs_shape.shape[-1]} outputs but "
                            f"{len(self.class_names)} class names")
    self.attention_keys = tuple(sorted(aux_shape))
    self._aux_tail = {k: tuple(v.shape[1:]) for k, v in aux_shape.items()}
    self._predict = jax.jit(predict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def has_local_attention(self) -> bool:
    """Whether the model computes local attention ``alpha`` over its 6x6 positions."""
    return "alpha" in self.attention_keys

  def warmup(self) -> float:
    """Compiles every batch size now, not on the first frames; returns the seconds taken."""
    if self.compile_seconds is None:
      start = time.perf_counter()
      for size in self.batch_sizes:
        self.predict_faces(np.zeros((size, FACE_SIZE, FACE_SIZE), np.uint8))
      self.compile_seconds = time.perf_counter() - start
      log.debug("predict compiled for batches %s in %.2f s", self.batch_sizes,
                self.compile_seconds)
    return self.compile_seconds

  def _batch_size(self, n: int) -> int:
    return next(size for size in self.batch_sizes if size >= n)

  def predict_faces(self, crops, *, attention: bool = False):
    """Class probabilities for already-cropped faces (no detection).

    Args:
      crops: uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)`` faces (an array or a
        list of faces), or one ``(48, 48)`` or ``(48, 48, 1)`` face; e.g. from
        :meth:`ferjax.faces.FaceDetector.crops` or ``FerData.images``. Colour
        crops go through :func:`ferjax.faces.to_gray` first.
      attention: also return the model's attention weights.

    Returns:
      float32 ``(N, C)`` probabilities (rows sum to 1); with ``attention``, a
      pair ``(probs, weights)`` where ``weights`` maps ``alpha`` to ``(N, 36)``
      local and ``beta`` to ``(N, T)`` global attention, for the attentions the
      model has.

    Raises:
      ValueError: crops of another shape or dtype.
    """
    try:
      crops_Nx48x48 = np.asarray(crops)
    except ValueError:  # A list of faces of different shapes.
      shapes = sorted({np.shape(c) for c in crops})
      raise ValueError(f"face crops must all be ({FACE_SIZE}, {FACE_SIZE}[, 1]), got a list "
                       f"with shapes {', '.join(map(str, shapes))}") from None
    if crops_Nx48x48.shape == (0,):  # An empty list: a frame without faces.
      crops_Nx48x48 = np.zeros((0, FACE_SIZE, FACE_SIZE), np.uint8)
    if crops_Nx48x48.shape == (FACE_SIZE, FACE_SIZE, 1):  # One face, as FerData.images[i].
      crops_Nx48x48 = crops_Nx48x48[..., 0]
    if crops_Nx48x48.ndim == 2:
      crops_Nx48x48 = crops_Nx48x48[None]
    if crops_Nx48x48.ndim == 4 and crops_Nx48x48.shape[-1] == 1:
      crops_Nx48x48 = crops_Nx48x48[..., 0]
    if crops_Nx48x48.ndim != 3 or crops_Nx48x48.shape[1:] != (FACE_SIZE, FACE_SIZE):
      colour = crops_Nx48x48.ndim in (3, 4) and crops_Nx48x48.shape[-1] in (3, 4)
      raise ValueError(f"face crops must be (N, {FACE_SIZE}, {FACE_SIZE}[, 1]) or one "
                       f"({FACE_SIZE}, {FACE_SIZE}[, 1]) face, got shape {np.shape(crops)}"
                       + ("; convert colour crops to grey with ferjax.faces.to_gray"
                          if colour else ""))
    if crops_Nx48x48.dtype != np.uint8:
      # Scaling is part of preprocess; floats here would be scaled twice or not at all.
      raise ValueError(f"face crops must be uint8 (0..255), got {crops_Nx48x48.dtype}")
    pending, counts = [], []
    for start in range(0, len(crops_Nx48x48), self.max_faces):
      chunk = crops_Nx48x48[start:start + self.max_faces]
      # A fresh zero-padded batch of one of the compiled sizes.
      batch_Bx48x48x1 = np.zeros((self._batch_size(len(chunk)), FACE_SIZE, FACE_SIZE, 1),
                                 np.uint8)
      batch_Bx48x48x1[:len(chunk), ..., 0] = chunk
      probs_BxC, aux = self._predict(batch_Bx48x48x1)
      pending.append((probs_BxC, aux) if attention else probs_BxC)
      counts.append(len(chunk))
    # Everything is dispatched before the one transfer back to the host; padding rows are
    # dropped there (slicing on the device would be one more dispatched op per shape).
    fetched = jax.device_get(pending)
    if attention:
      probs = [p[:c] for (p, _), c in zip(fetched, counts)]
      weights = {k: _concat([a[k][:c] for (_, a), c in zip(fetched, counts)],
                            (0, *self._aux_tail[k])) for k in self.attention_keys}
      return _concat(probs, (0, self.num_classes)), weights
    return _concat([p[:c] for p, c in zip(fetched, counts)], (0, self.num_classes))


def _as_constant(leaf):
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return leaf
  return np.array(leaf)  # A copy, not a view: the model's buffers may be donated later.


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
  if not parts:
    return np.zeros(empty_shape, np.float32)
  return np.concatenate(parts).astype(np.float32)


def render_attention_maps(path: str, *, checkpoint: str | os.PathLike | None = None,
                          which: str | int = "best", data=None, data_path: str | None = None,
                          split: str = "PrivateTest", num: int = 32, columns: int = 8,
                          on_error: str = "raise") -> dict:
  """Draws a model's local attention α over test faces as heat maps, to a PNG.

  The first ``num`` faces of ``split`` are shown, each titled with its true
  label, the predicted label and that prediction's probability.

  Args:
    path: the PNG to write (a name ending in .png).
    checkpoint: a training run's workdir; None uses the shipped default weights.
    which: ``best``, ``latest`` or a step number.
    data: a loaded :class:`ferjax.data.FerData` (else read from ``data_path``).
    data_path: FER2013 in any supported form (default ``$FER2013_PATH``).
    split: the split to take faces from; ``PrivateTest`` falls back to
      ``test`` for image-folder data.
    num: how many faces.
    columns: faces per row of the grid.
    on_error: ``skip`` drops malformed data rows instead of failing.

  Returns:
    ``{"path", "num", "split", "accuracy", "model", "step"}``: ``split`` is the
    split actually used, ``accuracy`` is over the shown faces (None when the
    data's label set is not the model's).

  Raises:
    ConfigError: the model has no local attention, no data path, ``num`` < 1,
      or ``path`` does not end in .png.
    CheckpointError, DataError: the checkpoint or the data cannot be read.
  """
  from ferjax import data as data_lib
  from ferjax import plots

  if num < 1:
    raise ConfigError(f"--num must be at least 1, got {num}")
  if not os.fspath(path).lower().endswith(".png"):  # Checked before the model loads.
    raise ConfigError(f"--output={path}: the figure is a PNG; give a name ending in .png")
  predictor = Predictor(checkpoint, which)
  if not predictor.has_local_attention:
    raise ConfigError(
        f"{predictor.checkpoint}: the {predictor.meta.get('model', 'given')!r} model has no local "
        "attention (alpha) to draw; use a checkpoint of acnn_alstm or vgg_alstm")
  if data is None:
    data = data_lib.load_fer2013(data_lib.fer2013_path(data_path), on_error=on_error)
  if split not in data.split_names and split in ("PrivateTest", "PublicTest") \
      and "test" in data.split_names:
    split = "test"  # Image-folder data has train/ and test/ only.
  subset = data.split(split)
  if num > len(subset):
    log.warning("--num=%d: %s has %d faces; drawing all of them", num, split, len(subset))
  faces_Nx48x48x1 = subset.images[:num]
  probs_NxC, weights = predictor.predict_faces(faces_Nx48x48x1, attention=True)
  pred = probs_NxC.argmax(axis=1)
  titles = [f"{data.class_names[t][:8]}→{predictor.class_names[p][:8]} {probs_NxC[i, p]:.2f}"
            for i, (t, p) in enumerate(zip(subset.labels[:num], pred))]
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  # Matplotlib takes about a second per dozen faces: say so before a long wait.
  log.info("drawing %d faces to %s", len(faces_Nx48x48x1), path)
  plots.plot_attention_grid(faces_Nx48x48x1, weights["alpha"], titles, path, columns=columns)
  same_labels = tuple(data.class_names) == predictor.class_names
  accuracy = float(np.mean(pred == subset.labels[:num])) if same_labels else None
  return {"path": os.path.abspath(path), "num": int(len(faces_Nx48x48x1)), "split": split,
          "accuracy": accuracy, "model": predictor.meta.get("model"),
          "step": predictor.meta.get("step")}
