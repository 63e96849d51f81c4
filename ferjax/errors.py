"""Errors that ferjax raises for bad input, each naming where the problem is."""

from __future__ import annotations

import numbers
import os


class FerjaxError(Exception):
  """Base class of every error ferjax raises on purpose.

  Entrypoints print these as one line and exit with a non-zero status instead
  of showing a traceback.
  """


class DataError(FerjaxError):
  """A data file is missing, unreadable or malformed.

  Attributes:
    path: the file (or folder) at fault.
    line: the 1-based line number inside ``path`` (None when not line based).
    reason: what is wrong, without the location.
  """

  def __init__(self, reason: str, *, path: str | os.PathLike, line: int | None = None):
    self.path = os.fspath(path)
    self.line = line
    self.reason = reason
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {reason}")


def is_whole(value: object, least: int | None = None) -> bool:
  """Whether ``value`` is an integer (numpy's too; not a float or a bool), and at least ``least``.

  Counts from library callers are checked with this before use: a float count
  would pass ``< 1`` checks and fail later, deep inside numpy, OpenCV or JAX.
  """
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and (least is None or value >= least))


class ConfigError(FerjaxError, ValueError):
  """A flag, config value or workdir does not fit what was asked for.

  Also a ValueError, as a bad argument to a library function.
  """


def nearest_existing(path: str) -> str:
  """``path`` itself if it exists, else its nearest existing ancestor (absolute)."""
  existing = os.path.abspath(path)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  return existing


def check_folder_path(path: str | os.PathLike, flag: str) -> None:
  """Raises ConfigError, naming ``--flag``, when folder ``path`` is or lies under a file.

  Checked before the work whose results go there: ``os.makedirs`` would fail
  only then, with a traceback (NotADirectoryError, FileExistsError).
  """
  given = os.fspath(path)
  target = os.path.abspath(given)
  existing = nearest_existing(target)
  if not os.path.isdir(existing):
    where = "" if existing == target else f": {existing}"
    raise ConfigError(f"--{flag}={given}{where} is a file, not a folder")


class CheckpointError(FerjaxError):
  """A checkpoint is missing or does not match the model that should load it."""


class TrainingDivergedError(FerjaxError):
  """The training loss, or a step's gradients, became NaN or infinite."""
