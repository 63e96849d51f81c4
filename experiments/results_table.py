r"""Prints the README's results tables from the runs' results/*.json files.

  python -m experiments.results_table            # reads results/, prints Markdown
  python -m experiments.results_table --readme=README.md   # and puts it in the README

``--results`` (default results/) is the folder of JSON files, ``--script``
(default experiments/reproduce_results.sh) where each row's command is found.

Main table: every model's PrivateTest accuracy (plain, flip and ten-crop TTA),
macro-F1, parameters, MFLOPs per image, epochs and training time (with the GPU
named, for runs trained on one; the others ran on the project's CPU), with the
command that produced the row (experiments/reproduce_results.sh). Short-schedule
table: the short-* runs (every model but vgg_alstm on the same few epochs) and the
ablation-* runs. FER+ rows: runs with labels=ferplus. Seed spread: a run NAME
repeated as NAME-seed<N> (same command, another --seed) gives one row with every
seed's PrivateTest accuracy (plain, flip and ten-crop), their mean, sample
standard deviation and range.
"""

import glob
import json
import logging
import os
import re
import statistics

from absl import flags

from ferjax import cli
from ferjax.errors import ConfigError

log = logging.getLogger("ferjax.results_table")

START, END = "<!-- results-table -->", "<!-- /results-table -->"

_RESULTS = flags.DEFINE_string("results", "results", "Folder of <run>.json files.")
_README = flags.DEFINE_string("readme", None, "Also write the tables into this Markdown file, "
                              f"between its {START} and {END} lines.")
_SCRIPT = flags.DEFINE_string("script", "experiments/reproduce_results.sh",
                              "Where each run's command is written.")


def _commands(script: str) -> dict[str, str]:
  """Run name → its full command, read from the script.

  A ``recalibrate NAME SOURCE`` row's command is SOURCE's training command followed
  by the recalibration.
  """
  out = {}
  if not os.path.exists(script):
    return out
  text = re.sub(r"\s*\\\n\s*", " ", open(script).read())  # Join continued lines.
  variables = dict(re.findall(r'^([A-Z]+)="([^"]*)"$', text, re.M))
  for name, args in re.findall(r"^run (\S+) (.*)$", text, re.M):
    for var, value in variables.items():
      args = args.replace(f"${var}", value)
    args = re.sub(r'--ferplus="\$\{FERPLUS_PATH[^"]*"', "--ferplus=$FERPLUS_PATH", args)
    out[name] = f"python -m experiments.train {args} --workdir=runs/{name}"
  for name, source in re.findall(r"^recalibrate (\S+) (\S+)$", text, re.M):
    out[name] = (f"{out.get(source, f'(runs/{source})')}; python -m experiments.recalibrate_bn "
                 f"--workdir=runs/{source} --output=runs/{name}")
  return out


def _is_short(name: str) -> bool:
  """Runs on the shared short schedule: the short-* models and the ablation."""
  return name.startswith(("ablation-", "short-"))


def seed_groups(runs: dict[str, dict]) -> dict[str, list[str]]:
  """Base run → [base, base-seed<N>, ...] for every base repeated with other seeds."""
  from ferjax.config import TrainConfig

  def recipe(name):  # What must match: the config's identity, but for the seed.
    identity = TrainConfig.from_dict(runs[name]["config"]).identity()
    identity.pop("seed")
    return identity

  groups = {}
  for name in runs:
    m = re.fullmatch(r"(.+)-seed\d+", name)
    if not (m and m.group(1) in runs):
      continue
    base = m.group(1)
    want, got = recipe(base), recipe(name)
    differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if differ:
      raise ConfigError(f"{name}.json: a seed repeat of {base} must differ only in its seed; "
                        f"it also differs in {', '.join(differ)}")
    if runs[name]["config"]["seed"] == runs[base]["config"]["seed"]:
      raise ConfigError(f"{name}.json: has the same seed as {base}.json")
    groups.setdefault(base, [base]).append(name)
  return groups


def seed_spread_table(runs: dict[str, dict]) -> str:
  """Markdown rows: per repeated run, each seed's PrivateTest accuracy (plain, flip and
  ten-crop TTA) and their spread."""
  lines = []
  for base, names in seed_groups(runs).items():
    names = sorted(names, key=lambda n: runs[n]["config"]["seed"])
    cells = []
    for key in ("test_tta_none", "test_tta_flip", "test_tta_ten_crop"):
      accs = [100 * runs[n][key]["accuracy"] for n in names if runs[n].get(key)]
      if len(accs) < len(names):  # A seed without this evaluation: no spread to show.
        cells.append("— | — | — | —")
        continue
      cells.append(f"{' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
                   f"{statistics.stdev(accs):.2f} | {max(accs) - min(accs):.2f}")
    seeds = ", ".join(str(runs[n]["config"]["seed"]) for n in names)
    lines.append(f"| `{base}` | {seeds} | {' | '.join(cells)} |")
  if not lines:
    return ""
  stats = " | mean | s.d. | range"
  return (f"| run | seeds | PrivateTest % per seed{stats} | flip TTA % per seed{stats} | "
          f"ten-crop % per seed{stats} |\n"
          "| --- | --- |" + " --- | ---: | ---: | ---: |" * 3 + "\n" + "\n".join(lines) + "\n")


def _hours(seconds) -> str:
  if seconds is None:
    return "—"
  return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 3600:.2f} h"


def _on_accelerator(result: dict) -> str:
  """" on <GPU>" for a run trained on an accelerator; runs without the field ran on the CPU."""
  device = result.get("device") or {}
  if device.get("platform", "cpu") == "cpu":
    return ""
  count = device.get("count", 1)
  return f" on {'' if count == 1 else f'{count} x '}{device.get('kind', device['platform'])}"


_RUN_KEYS = ("config", "model", "labels", "test_tta_none", "test_tta_flip")


def _read_run(path: str) -> dict:
  """A training run's ``results.json``; a ConfigError naming the file for anything else."""
  try:
    with open(path) as f:
      run = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read it as JSON ({e})") from None
  missing = [k for k in _RUN_KEYS if not isinstance(run, dict) or k not in run]
  if missing:
    raise ConfigError(f"{path}: not a training run's results.json (no {', '.join(missing)}); "
                      "keep other JSON (evaluations, ensembles) in a subfolder")
  return run


@cli.exit_on_errors
def main(argv):
  cli.start(argv, runs_model=False, compiles=False)
  from ferjax.models.summary import model_cost

  commands = _commands(_SCRIPT.value)
  paths = {os.path.basename(p)[:-5]: p for p in glob.glob(os.path.join(_RESULTS.value, "*.json"))}
  runs = {name: _read_run(paths[name]) for name in sorted(paths)}  # NAME before NAME-seed1.
  if not runs:
    raise ConfigError(f"--results={_RESULTS.value}: no <run>.json files there")
  readme = _read_readme(_README.value) if _README.value else None  # Fail before the work.
  cost = {}

  def row(name, r):
    key = (r["model"], json.dumps(r["config"]["model_overrides"], sort_keys=True),
           8 if r["labels"] == "ferplus" else 7)
    if key not in cost:  # Compiles the model for XLA's cost analysis: seconds each.
      log.info("counting parameters and FLOPs: %s%s", r["model"],
               "".join(f" {k}={v}" for k, v in sorted(r["config"]["model_overrides"].items())))
      cost[key] = model_cost(r["model"], key[2], **r["config"]["model_overrides"])
    params, mflops = cost[key]
    none, flip = r["test_tta_none"], r["test_tta_flip"]
    ten = r.get("test_tta_ten_crop")
    ten = f"{100 * ten['accuracy']:.2f}" if ten else "—"
    return (f"| `{name}` | {100 * none['accuracy']:.2f} | {100 * flip['accuracy']:.2f} | {ten} | "
            f"{none['macro_f1']:.3f} | {params:,} | {mflops:.2f} | "
            f"{r.get('epochs_trained') or r['config']['epochs']:g} | "
            f"{_hours(r.get('train_seconds'))}{_on_accelerator(r)} | `{commands.get(name, '')}` |")

  header = ("| run | PrivateTest acc. % | flip TTA % | ten-crop TTA % | macro-F1 | params | "
            "MFLOPs | epochs | train time | command |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  groups = (("Models, full schedules (FER2013, 7 classes)",
             lambda n, r: r["labels"] == "fer2013" and not _is_short(n)),
            ("Every model but vgg_alstm on one short schedule, and the ablation of acnn_alstm "
             "(ablation-base is acnn_alstm; without local attention it is short-cnn_alstm, "
             "without either attention short-cnn_lstm)", lambda n, r: _is_short(n)),
            ("FER+ (8 classes, majority votes)", lambda n, r: r["labels"] == "ferplus"))
  tables = []
  for title, keep in groups:
    rows = [row(n, r) for n, r in runs.items() if keep(n, r)]
    if rows:
      tables.append(f"#### {title}\n\n{header}\n" + "\n".join(rows) + "\n")
  spread = seed_spread_table(runs)
  if spread:
    tables.append("#### Seed spread (the same command with other seeds; s.d. is the sample "
                  f"standard deviation)\n\n{spread}")
  text = "\n".join(tables)
  print(text)
  if readme is not None:
    _write_between_markers(_README.value, readme, text)


def _read_readme(path: str) -> list[str]:
  """The file's lines; it must exist and hold the START marker line."""
  try:
    with open(path) as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise ConfigError(f"--readme={path}: {e.strerror}") from e
  if START not in lines:
    raise ConfigError(f"--readme={path}: no line {START} to put the tables after")
  return lines


def _write_between_markers(path: str, lines: list[str], text: str) -> None:
  """Replaces the lines between START and END (END is added if missing) and writes ``path``."""
  begin = lines.index(START)
  end = lines.index(END, begin) + 1 if END in lines[begin:] else begin + 1
  lines[begin:end] = [START, "", *text.rstrip("\n").split("\n"), "", END]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, path)


if __name__ == "__main__":
  cli.run(main)
