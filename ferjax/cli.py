"""What every entrypoint shares: logging set-up, option parsing, one-line errors."""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ferjax.errors import ConfigError, FerjaxError


def setup_logging(verbose: bool = False) -> None:
  """ferjax's own messages at INFO on stderr; library chatter (orbax, absl) at WARNING."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  ours = logging.getLogger("ferjax")
  ours.handlers[:] = [handler]
  ours.setLevel(logging.DEBUG if verbose else logging.INFO)
  ours.propagate = False
  quiet_libraries()


def quiet_libraries() -> None:
  """Library chatter (absl, orbax, JAX's backend search) at WARNING only.

  The benchmarks call it alone, so their tables are not interleaved with, say,
  "Unable to initialize backend 'tpu'" or checkpoint-restore notes.
  """
  for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Orbax warns for every checkpoint saved without eval metrics (our mid-epoch
  # resume points); that is by design here.
  logging.getLogger("absl").addFilter(
      lambda record: "did not provide metrics" not in record.getMessage())
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
  """Keeps XLA's compiled programs on disk, so a second start skips compiling them.

  Loading a checkpoint and compiling predict for the realtime script's batch
  sizes, or an evaluation's steps, is most of a start; later starts read the
  programs back. The cache lives in ``<ferjax cache>/xla`` (see
  ``ferjax.data.default_cache_dir``) unless ``directory`` or JAX's own
  ``JAX_COMPILATION_CACHE_DIR`` names another; ``JAX_ENABLE_COMPILATION_CACHE=false``
  turns it off. Entries are keyed on the program, the compile options and the
  JAX version, so a stale entry is never used; the folder is safe to delete.

  Returns:
    The cache folder, or None when turned off.
  """
  import jax

  from ferjax.data import default_cache_dir

  if not jax.config.jax_enable_compilation_cache:
    return None
  if directory is None:
    directory = jax.config.jax_compilation_cache_dir or os.path.join(default_cache_dir(), "xla")
  directory = os.fspath(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # JAX keeps only compiles over 1 s; a start is dozens of shorter ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


def start(argv: Sequence[str], *, runs_model: bool = True, compiles: bool = True) -> None:
  """The first lines of an ``experiments`` entrypoint's ``main``.

  Refuses stray arguments (``absl.app.UsageError``), keeps freed memory for
  XLA when the entrypoint runs a model on data (before JAX starts: see
  ``ferjax.hostmem``), sets up logging, and turns on the compilation cache
  when it compiles anything.
  """
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if runs_model:
    from ferjax import hostmem
    hostmem.retain_freed_memory()
  setup_logging()
  if compiles:
    enable_compilation_cache()


def run(main: Callable[..., Any]) -> None:
  """``absl.app.run(main)``, except that asking for help exits with status 0.

  absl prints the usage for ``--help``, ``-?``, ``--helpshort``, ``--helpfull``
  and ``--helpxml`` and then exits with status 1, the status of a bad flag, so
  ``python -m experiments.train --help && ...`` in a script would stop there.
  Only an exit raised by one of those help flags is changed; a flag error
  still exits with 1.
  """
  from absl import app

  try:
    app.run(main)
  except SystemExit as e:
    if e.code == 1 and _raised_by_help_flag(e):
      sys.exit(0)
    raise


def _raised_by_help_flag(e: BaseException) -> bool:
  from absl import app

  helps = (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag, app.HelpXMLFlag)
  tb = e.__traceback__
  while tb is not None:  # The exit is raised a call or two below the flag's parse().
    if isinstance(tb.tb_frame.f_locals.get("self"), helps):
      return True
    tb = tb.tb_next
  return False


def exit_on_errors(main: Callable[..., Any]) -> Callable[..., Any]:
  """Turns ferjax's errors into one line on stderr and exit status 2.

  A usage error (``absl.app.UsageError``: a stray argument, flags that do not go
  together) becomes one line too, with exit status 1 as for a bad flag value;
  absl itself would print the whole flag list above it.
  """
  from absl import app

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except app.UsageError as e:
      print(f"error: {e} (--helpshort lists the flags)", file=sys.stderr)
      sys.exit(e.exitcode)
    except FerjaxError as e:
      print(f"error: {_as_flag(str(e))}", file=sys.stderr)
      _drop_abandoned_coroutines()
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper


def _as_flag(message: str) -> str:
  """``--name ...`` for a message about a setting that is one of this program's flags.

  The library names its settings as its arguments and config fields do
  (``epochs must be at least 1, got 0``); the entrypoints' flags have the same
  names, so a message that opens with one of them, followed by ``must``,
  ``needs`` or ``and``, is given the flag's dashes (and so is a second flag
  after that ``and``).
  """
  from absl import flags

  match = re.match(r"([a-z][a-z0-9_]*) (must |needs |and ([a-z][a-z0-9_]*) )", message)
  if not match or match[1] not in flags.FLAGS:
    return message
  if match[3] and match[3] in flags.FLAGS:  # "ema_decay and swa_epochs both ...": both flags.
    return f"--{match[1]} and --{message[match.start(3):]}"
  return "--" + message


def _drop_abandoned_coroutines() -> None:
  """Keeps the one-line error the last thing printed.

  When one array of a damaged checkpoint fails to read, Orbax leaves its other
  reads' coroutines pending; finalised at exit, each raises again and Python
  prints it as "Exception ignored in: <coroutine ...>" with a page of
  TensorStore spec under the error already reported. Other unraisable
  exceptions still reach the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not inspect.iscoroutine(unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook


def number_list(holder, kind: type = float, minimum: float | None = None) -> list:
  """The values of a list flag (``flags.DEFINE_list``'s holder) as numbers of ``kind``.

  Raises:
    absl.app.UsageError: naming the flag, for a value that is not such a number
      or is below ``minimum``.
  """
  from absl import app

  what = "an integer" if kind is int else "a number"
  out = []
  for text in holder.value:
    try:
      value = kind(text)
    except ValueError:
      raise app.UsageError(f"--{holder.name}: {text!r} is not {what}") from None
    if minimum is not None and value < minimum:
      raise app.UsageError(f"--{holder.name}: {text} is below {minimum}")
    out.append(value)
  return out


def parse_options(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
  """Parses ``key=value`` strings; values are Python literals, ``true``/``false`` or text.

  Example: ``["lstm_hidden=256", "bidirectional=true", "widths=(32,64,128,128)"]``.
  """
  # A lone string would be read a character at a time ("--model_option='w': expected key=value").
  if isinstance(items, (str, bytes, dict)):
    example = "lstm_hidden=256" if flag == "model_option" else "mixup_alpha=0.2"
    hint = (f"; a dict of options goes to default_config(model, model_overrides={items!r})"
            if isinstance(items, dict) and flag == "model_option" else "")
    raise ConfigError(f"--{flag}: expected a list of key=value strings, e.g. [{example!r}], "
                      f"got {type(items).__name__} {items!r}{hint}")
  out: dict[str, Any] = {}
  for item in items or ():
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"--{flag}={item!r}: expected key=value")
    text = text.strip()
    if text.lower() in ("true", "false"):
      value: Any = text.lower() == "true"
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
    out[key.strip()] = value
  return out


def train_config(model: str, *, labels: str = "fer2013", model_options: Sequence[str] | None = None,
                 augment_options: Sequence[str] | None = None, **changes: Any):
  """The training config that ``experiments.train`` builds from its flags.

  ``model``'s registry defaults (:func:`ferjax.config.default_config`) with
  ``changes`` on top; ``--model_option`` and ``--augment`` strings
  (``key=value``) change single fields of the model and of the model's own
  augmentation defaults, leaving the rest as they were.
  """
  import dataclasses

  from ferjax.augment import AugmentConfig
  from ferjax.config import default_config

  augment = parse_options(augment_options, "augment")
  known = {f.name for f in dataclasses.fields(AugmentConfig)}
  unknown = sorted(set(augment) - known)
  if unknown:
    raise ConfigError(f"--augment: unknown option(s) {', '.join(unknown)}; "
                      f"known: {', '.join(sorted(known))}")
  if augment:
    changes["augment"] = dataclasses.replace(default_config(model).augment, **augment)
  return default_config(model, labels=labels,
                        model_overrides=parse_options(model_options, "model_option"), **changes)
