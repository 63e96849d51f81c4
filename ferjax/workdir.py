"""The run folder: taking it, checking that it holds this run, and its records.

A workdir holds one run: ``config.json``, ``checkpoints/``, ``metrics.jsonl``
(one JSON record per evaluation), ``curves.png``, ``results.json`` and, with
tensorboardX installed, ``tensorboard/``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil

from ferjax import evaluate as evaluate_lib
from ferjax import parallel
from ferjax import plots
from ferjax.config import TrainConfig
from ferjax.errors import ConfigError, check_folder_path

log = logging.getLogger(__name__)


def lock_workdir(workdir: str) -> int | None:
  """Takes ``workdir`` for this process: an open descriptor holding an exclusive lock.

  Two training processes in one workdir (the same command started twice) would
  interleave their checkpoints and records, so the second is refused. The lock is
  the folder's own ``flock``: nothing is written, and the system drops it when the
  process ends, however it ends. Close the descriptor to release it. Without
  ``fcntl`` (Windows) this returns None; a file system that refuses the lock (some
  network mounts) leaves the run unguarded, with the descriptor still returned.
  """
  try:
    import fcntl
  except ImportError:
    return None
  fd = os.open(workdir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise ConfigError(f"--workdir={workdir} is in use by another training process (the same "
                      "command started twice?); wait for it to end, or use another "
                      "--workdir") from None
  except OSError as e:
    log.debug("%s: no lock (%s); the run is not guarded against a second process", workdir, e)
  return fd


def same_folder(fd: int, path: str) -> bool:
  """Whether the open descriptor ``fd`` (from :func:`lock_workdir`) is the folder ``path``."""
  a, b = os.fstat(fd), os.stat(path)
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def prepare_workdir(workdir: str, config: TrainConfig, *, fresh: bool,
                    data_digest: dict[str, str] | None = None) -> None:
  """Refuses to mix runs: a workdir holding another run's config, or data, is an error.

  With ``fresh`` an existing run is moved aside (never deleted) and a new one
  starts. ``data_digest`` (split name → digest of its images and labels) is
  compared with the one the run saved, when both exist: a run resumed on other
  data would mix two data sets in one set of weights.
  """
  check_folder_path(workdir, "workdir")  # The folder, or one above it, a file.
  config_file = os.path.join(workdir, "config.json")
  has_run = os.path.exists(config_file) or os.path.isdir(os.path.join(workdir, "checkpoints"))
  if has_run and fresh:
    if parallel.is_primary():  # In a multi-host run the other processes leave it to process 0.
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      aside = f"{workdir.rstrip(os.sep)}.old-{stamp}"
      shutil.move(workdir, aside)
      log.warning("--fresh: moved the previous run in %s to %s", workdir, aside)
    has_run = False
  if has_run:
    if not os.path.exists(config_file):
      raise ConfigError(f"{workdir} holds checkpoints but no config.json; use another "
                        "--workdir (or --fresh to move it aside)")
    try:
      with open(config_file) as f:
        saved = json.load(f)
      theirs = TrainConfig.from_dict(saved["config"]).identity()
    except (OSError, ValueError, KeyError, TypeError) as e:
      why = e.strerror if isinstance(e, OSError) else (
          f"no {e} entry" if isinstance(e, KeyError) else str(e))
      raise ConfigError(f"{config_file}: not a ferjax run's config ({why}); use another "
                        "--workdir (or --fresh to move it aside)") from None
    ours = config.identity()
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
      detail = "; ".join(f"{k}: saved {theirs.get(k)!r}, now {ours.get(k)!r}" for k in diff)
      raise ConfigError(f"{workdir} holds a different run ({detail}). Use another --workdir, "
                        "or --fresh to move the old run aside and start over")
    saved_digest = saved.get("data_digest")
    if data_digest and isinstance(saved_digest, dict):
      changed = [name for name, value in data_digest.items()
                 if name in saved_digest and saved_digest[name] != value]
      if changed:
        raise ConfigError(f"{workdir} holds a run trained on other data: the images or labels "
                          f"of {', '.join(changed)} differ from the data it started with "
                          "(another file, or --skip_bad_rows dropping other rows). Resume with "
                          "the same data, use another --workdir, or --fresh to move the old "
                          "run aside and start over")
  os.makedirs(workdir, exist_ok=True)


def finished_results(workdir: str, store, *, swa: bool = False) -> dict | None:
  """``results.json`` when it reports the run's current best checkpoint, else None.

  With ``swa``, also its weight average, written to ``workdir/swa``.
  """
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(results, dict) or results.get("best_step") != store.resolve("best"):
    return None
  if not all(f"test_tta_{tta}" in results for tta in evaluate_lib.TTA_MODES):
    return None
  if swa and not ("swa" in results and (
      not results["swa"].get("count")
      or os.path.isdir(os.path.join(workdir, "swa", "checkpoints")))):
    return None
  return results


def _read_records(workdir: str) -> list[dict]:
  """The evaluation records of ``metrics.jsonl``, oldest first."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_records_after(workdir: str, step: int) -> None:
  """Drops the records of steps after ``step``, the checkpoint this session starts from.

  A session that stopped while saving an evaluation's checkpoint had already
  written its record; this session evaluates that step again and writes it anew.
  """
  records = _read_records(workdir)
  kept = [r for r in records if r.get("step", 0) <= step]
  dropped = [r for r in records if r.get("step", 0) > step]
  if not dropped:
    return
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(path + ".tmp", path)  # Atomic: a crash here leaves the old records.
  log.warning("%s: dropped the records of step%s %s, written after the last checkpoint (step %d)",
              path, "s" if len(dropped) > 1 else "", ", ".join(str(r["step"]) for r in dropped),
              step)


def last_record(workdir: str) -> dict:
  """The latest evaluation record, or ``{}`` before the first."""
  records = _read_records(workdir)
  return records[-1] if records else {}


def best_accuracy(workdir: str, best_step: int) -> float:
  """The evaluation accuracy recorded for ``best_step``, or -1 when none is."""
  matches = [r["eval_accuracy"] for r in _read_records(workdir) if r.get("step") == best_step]
  return float(matches[-1]) if matches else -1.0


def write_record(workdir: str, record: dict, writer) -> None:
  """Appends ``record`` to ``metrics.jsonl``, redraws the curves and logs it to ``writer``."""
  if not parallel.is_primary():
    return
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
  plots.plot_training_curves(_read_records(workdir), os.path.join(workdir, "curves.png"))
  if writer is not None:
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        writer.add_scalar(k, v, record["step"])
    writer.flush()


def summary_writer(workdir: str):
  """A tensorboardX writer into ``workdir/tensorboard``, or None (not installed, or not
  process 0)."""
  if not parallel.is_primary():
    return None
  try:
    from tensorboardX import SummaryWriter  # Optional dependency.
  except ImportError:
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))
