"""The absl entrypoints: a smoke run, and one-line errors with non-zero exits."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import fer_rows, write_csv

# The tests here share a module fixture (a trained run): one pytest-xdist worker runs
# them all, so it is made once.
pytestmark = pytest.mark.xdist_group("test_cli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model_option=widths=(4,4,8,8)", "--model_option=lstm_hidden=8",
        "--model_option=attention_size=8"]


def run(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600,
                        env={**os.environ, "FERJAX_CACHE_DIR": os.environ.get(
                            "FERJAX_CACHE_DIR", "/tmp/ferjax-test-cache"), **(env or {})})


def test_the_xdist_groups_hold(request):
  """Under --dist loadgroup (the default addopts) this module runs on one worker.

  With pytest 9.2 pytest-xdist ignored every xdist_group mark without a word (its issue
  #1386), so both workers built each module's shared fixtures; pyproject.toml pins pytest
  below 9.2. This fails if the grouping is lost again.
  """
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not run by a pytest-xdist worker under --dist loadgroup")
  assert request.node.nodeid.endswith("@test_cli"), request.node.nodeid


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
  rows = fer_rows(32, usages=("Training",)) + fer_rows(9, usages=("PublicTest",)) + \
      fer_rows(9, usages=("PrivateTest",))
  return write_csv(tmp_path_factory.mktemp("cli") / "fer2013.csv", rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, csv_path):
  """A tiny acnn_alstm run through the train entrypoint: (workdir, its output)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  r = run("experiments.train", "--model=acnn_alstm", f"--data={csv_path}", f"--workdir={workdir}",
          "--epochs=1", "--batch_size=8", "--eval_batch_size=8", "--max_steps=3", *TINY)
  return workdir, r


def test_train_then_evaluate(trained, csv_path):
  workdir, r = trained
  assert r.returncode == 0, r.stderr[-3000:]
  assert "acnn_alstm: PrivateTest accuracy" in r.stdout
  assert f"next: python -m experiments.recalibrate_bn --workdir={workdir} " \
      f"--output={workdir}-bnrecal" in r.stdout  # A model with BatchNorm.
  assert "PublicTest loss" in r.stderr  # The per-epoch line.
  assert "labels (7 classes) | 1 device (" in r.stderr  # Not "1 devices".
  assert os.path.exists(os.path.join(workdir, "results.json"))
  r = run("experiments.evaluate", f"--workdir={workdir}", "--tta=flip", f"--data={csv_path}",
          "--batch_size=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "accuracy" in r.stdout and "confusion" in r.stdout
  out = [f for f in os.listdir(workdir) if f.startswith("eval-PrivateTest") and f.endswith(".json")]
  assert json.load(open(os.path.join(workdir, out[0])))["num_examples"] == 9
  # Against itself: the same faces right, nothing to tell apart.
  r = run("experiments.evaluate", f"--workdir={workdir}", f"--baseline={workdir}",
          f"--data={csv_path}", "--batch_size=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"against {workdir} (acnn_alstm, step 3): " in r.stdout
  assert "(+0.00 points); right here only 0, there only 0, of 9 faces; McNemar exact p = 1" \
      in r.stdout


def test_train_with_weight_averaging_reports_the_average_and_evaluate_reads_it(tmp_path,
                                                                                csv_path):
  workdir = str(tmp_path / "run")
  r = run("experiments.train", "--model=acnn_alstm", f"--data={csv_path}", f"--workdir={workdir}",
          "--epochs=2", "--swa_epochs=1", "--swa_learning_rate=1e-3", "--batch_size=8",
          "--eval_batch_size=8", *TINY)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["swa"]["epochs"] == [2] and results["config"]["swa_learning_rate"] == 1e-3
  average = results["test_tta_none"]["accuracy"]
  assert (f"acnn_alstm, average of epochs 2-2: PrivateTest accuracy {average:.2%}"
          in r.stdout)
  assert f"in {os.path.join(workdir, 'swa')} (the run's result" in r.stdout
  assert "next: python -m experiments.recalibrate_bn" not in r.stdout  # Already recalibrated.
  r = run("experiments.evaluate", f"--workdir={workdir}/swa", f"--data={csv_path}",
          "--batch_size=8", f"--output_dir={tmp_path / 'eval'}")
  assert r.returncode == 0, r.stderr[-3000:]
  (out,) = [f for f in os.listdir(tmp_path / "eval") if f.endswith(".json")]
  assert json.load(open(tmp_path / "eval" / out))["accuracy"] == pytest.approx(average)
  # A bad combination is one line naming the flags, before anything is written.
  r = run("experiments.train", "--model=acnn_alstm", f"--data={csv_path}",
          f"--workdir={tmp_path / 'bad'}", "--epochs=2", "--swa_epochs=3", *TINY)
  assert r.returncode == 2 and not os.path.exists(tmp_path / "bad")
  assert "swa_epochs must be between 0 and epochs (2), got 3" in r.stderr


def test_a_second_start_reads_its_programs_from_the_compilation_cache(tmp_path, trained,
                                                                      csv_path):
  workdir, r = trained
  assert r.returncode == 0, r.stderr[-3000:]
  cache = tmp_path / "cache"
  args = [f"--workdir={workdir}", "--tta=flip", f"--data={csv_path}", "--batch_size=8",
          f"--output_dir={tmp_path / 'out'}"]
  r = run("experiments.evaluate", *args, env={"FERJAX_CACHE_DIR": str(cache)})
  assert r.returncode == 0, r.stderr[-3000:]
  first = sorted(os.listdir(cache / "xla"))
  assert any(name.startswith("jit_") for name in first)
  r = run("experiments.evaluate", *args, env={"FERJAX_CACHE_DIR": str(cache)})
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(cache / "xla")) == first  # Every program came from the cache.
  off = tmp_path / "off"
  r = run("experiments.evaluate", *args, env={"FERJAX_CACHE_DIR": str(off),
                                              "JAX_ENABLE_COMPILATION_CACHE": "false"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert not (off / "xla").exists()


def test_train_flags_change_only_what_they_name():
  from ferjax.cli import train_config
  from ferjax.config import default_config
  from ferjax.errors import ConfigError
  from ferjax.models import model_names
  for name in model_names():  # No flags: exactly the registry's config for the model.
    assert train_config(name) == default_config(name)
  config = train_config("vgg_alstm", augment_options=["max_rotation=5"], model_options=[
      "lstm_hidden=64"], epochs=3)
  default = default_config("vgg_alstm")
  assert config.augment == dataclasses.replace(default.augment, max_rotation=5)
  assert config.augment.max_shift == default.augment.max_shift
  assert config.model_overrides == {"lstm_hidden": 64} and config.epochs == 3
  assert config.weight_decay == default.weight_decay
  with pytest.raises(ConfigError, match="--augment: unknown option.s. spin"):
    train_config("dnn", augment_options=["spin=3"])
  # Two options in one flag (it is repeatable, not a list) come back as one bad value.
  with pytest.raises(ConfigError, match="cutmix_alpha='1.0,mixup_alpha=0.2': must be a number"):
    train_config("dnn", augment_options=["cutmix_alpha=1.0,mixup_alpha=0.2"])
  mixing = train_config("dnn", augment_options=["cutmix_alpha=1", "mixup_alpha=0.2"])
  assert mixing.augment.mixes and (mixing.augment.cutmix_alpha, mixing.augment.mixup_alpha) == (1, 0.2)


def test_train_config_options_given_as_one_string_or_a_dict_are_named():
  from ferjax.cli import train_config
  from ferjax.errors import ConfigError
  # Before: read a character at a time, "--model_option='w': expected key=value".
  with pytest.raises(ConfigError, match=r"--model_option: expected a list of key=value strings, "
                                        r"e\.g\. \['lstm_hidden=256'\], got str 'width=32'$"):
    train_config("dnn", model_options="width=32")
  with pytest.raises(ConfigError, match=r"--augment: expected a list .*\['mixup_alpha=0.2'\], "
                                        r"got str 'mixup_alpha=0.2'$"):
    train_config("dnn", augment_options="mixup_alpha=0.2")
  with pytest.raises(ConfigError, match=r"got dict \{'width': 32\}; a dict of options goes to "
                                        r"default_config\(model, model_overrides=\{'width': 32\}\)$"):
    train_config("dnn", model_options={"width": 32})
  assert train_config("dnn", model_options=("width=32",)).model_overrides == {"width": 32}


@pytest.mark.parametrize("args,code,message", [
    (["--model=resnet"], 1, "value should be one of <dnn|cnn_lstm|cnn_alstm|acnn_alstm|vgg_alstm>"),
    (["--optimizer=lamb"], 1, "value should be one of <adamw|adam|sgd>"),
    (["--data=/no/such/file.csv"], 2, "error: /no/such/file.csv: no such file or directory"),
    (["--model_option=hidden=3"], 2, "error: model 'acnn_alstm' has no option hidden"),
    # The library's message names the setting; the entrypoint gives it the flag's dashes.
    (["--epochs=0"], 2, "error: --epochs must be at least 1"),
    (["--swa_epochs=2", "--ema_decay=0.9"], 2,
     "error: --ema_decay and --swa_epochs both average the weights"),
    # A switch spelled other than true/false would otherwise read as on.
    (["--model_option=bidirectional=no"], 2, "error: model option bidirectional='no': must be "
     "true or false"),
    (["--augment=flip=off"], 2, "error: augment option flip='off': must be true or false"),
    (["--augment=erase_area=0.1"], 2, "error: augment option erase_area=0.1: must be a range"),
])
def test_train_errors_are_one_line(tmp_path, args, code, message):
  r = run("experiments.train", f"--workdir={tmp_path / 'w'}", *args, env={"FER2013_PATH": ""})
  assert r.returncode == code
  assert message in r.stderr
  if code == 2:
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("module,args,message", [
    ("experiments.train", ["stray"], "error: unexpected arguments: stray"),
    # A traceback from jax.distributed.initialize before.
    ("experiments.train", ["--distributed"], "error: --distributed: coordinator_address should "
     "be defined (where no cluster manager such as SLURM, Open MPI or Kubernetes supplies "
     "them, pass --coordinator_address, --num_processes and --process_id)"),
    ("experiments.evaluate", ["--workdir=a,a", "--output_dir=unused"],
     "error: --workdir names a run twice: a,a"),
    ("experiments.evaluate", ["--workdir=a,b", "--output_dir=unused", "--baseline=c"],
     "error: --baseline compares one run with another: give --workdir one run, not an "
     "ensemble"),
    ("experiments.evaluate", ["--workdir=a,b", "--output_dir=unused", "--mistakes=3"],
     "error: --mistakes draws one run's mistakes: give --workdir one run, not an ensemble"),
    ("experiments.evaluate", ["--workdir=a", "--baseline= "],
     "error: --baseline is empty; give the workdir of the run to compare with"),
    # "an ensemble needs at least two runs, got []" before.
    ("experiments.evaluate", ["--workdir="], "error: --workdir is empty; give a training run's "
     "workdir, or several separated by commas"),
    ("benchmarks.predict_latency", ["stray", "more"], "error: unexpected arguments: stray more"),
    ("benchmarks.jit_overhead", ["stray"], "error: unexpected arguments: stray"),
    ("benchmarks.data_loading", ["--data=x.csv", "stray"], "error: unexpected arguments: stray"),
    ("benchmarks.startup", ["stray"], "error: unexpected arguments: stray"),
    ("benchmarks.smoothing", ["--smooth=0,x"], "error: --smooth: 'x' is not a number"),
    # Python's ValueError tracebacks before.
    ("benchmarks.tracking", ["--redetect=3,abc"], "error: --redetect: 'abc' is not an integer"),
    ("benchmarks.realtime_fps", ["--downscales=2,0.5"], "error: --downscales: 0.5 is below 1.0"),
    ("benchmarks.train_throughput", ["--notorch", "--peak_sizes=2048,x"],
     "error: --peak_sizes: 'x' is not an integer"),
])
def test_usage_errors_are_one_line(module, args, message):
  # absl alone prints the whole flag list (about 90 lines for train) above the message.
  r = run(module, *args)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [f"{message} (--helpshort lists the flags)"]


def test_number_list_reads_a_list_flag_as_numbers_or_names_it():
  from absl import app, flags

  from ferjax.cli import number_list

  values = flags.FlagValues()
  holder = flags.DEFINE_list("sizes", ["1"], "", flag_values=values)
  values(["prog", "--sizes=3,0.5,12"])
  assert number_list(holder) == [3.0, 0.5, 12.0]
  with pytest.raises(app.UsageError, match=r"^--sizes: '0\.5' is not an integer$"):
    number_list(holder, int)
  with pytest.raises(app.UsageError, match=r"^--sizes: 0\.5 is below 1$"):
    number_list(holder, minimum=1)
  values(["prog", "--sizes=3,12"])
  assert number_list(holder, int, minimum=3) == [3, 12]


def test_a_failing_timed_command_is_one_error_with_its_stderr_tail():
  # benchmarks.startup raised a RuntimeError (a traceback) when the realtime command failed.
  code = ("import sys; from absl import app; from benchmarks import startup; "
          "startup._COMMAND[:] = [sys.executable, '-c', "
          "'import sys; print(1, file=sys.stderr); sys.exit(\"no camera here\")']; "
          "app.run(startup.main)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-2:] == ["1", "no camera here"]
  assert "failed with exit status 1:" in r.stderr


@pytest.mark.parametrize("module,flag", [
    ("experiments.train", "--help"), ("experiments.evaluate", "--helpshort"),
    ("experiments.realtime", "--helpfull"), ("benchmarks.predict_latency", "-?"),
])
def test_asking_for_help_exits_0_and_a_bad_flag_still_fails(module, flag):
  # absl exits 1 after printing the help, as for a flag error.
  r = run(module, flag)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"{module.replace('.', '/')}.py:" in r.stdout, r.stdout[:500]  # Its flags listed.
  if module == "experiments.realtime":  # The flags' defaults are the library's.
    from ferjax import video
    for flag, value in (("redetect_every", video.REDETECT_EVERY),
                        ("track_grace", video.TRACK_GRACE_FRAMES)):
      assert re.search(rf"--{flag}:.*?\(default: '(\d+)'\)", r.stdout, re.S)[1] == str(value)
  bad = run(module, "--no_such_flag")
  assert bad.returncode == 1 and "no_such_flag" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--model_option=bidirectional=no"], "error: model option bidirectional='no': must be "
     "true or false"),
    (["--model_option=lstm_hidden=-1"], "error: model option lstm_hidden=-1: must be a whole "
     "number of at least 1"),
    (["--model_option=widths=(8,8)"], "error: model 'acnn_alstm' with options widths=(8, 8): "
     "pool_after (0, 1, 3) names blocks outside 0..1"),
])
def test_model_table_option_errors_are_one_line(args, message):
  # These gave tracebacks (or, for bidirectional=no, a bidirectional table).
  r = run("experiments.model_table", "--model=acnn_alstm", *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [message]


@pytest.mark.parametrize("args,message", [
    (["--batch_size=64"], "error: --batch_size=64 is larger than the 32 examples of Training"),
    (["--batch_size=8", "--model_option=lstm_layers=0"],
     "error: model option lstm_layers=0: must be a whole number of at least 1"),
    (["--batch_size=8", "--model_option=widths=(8,8)"], "error: model 'acnn_alstm' with options widths=(8, 8): "
     "pool_after (0, 1, 3) names blocks outside 0..1"),
])
def test_config_errors_found_with_the_data_stop_before_the_workdir(tmp_path, csv_path, args,
                                                                    message):
  r = run("experiments.train", f"--data={csv_path}", f"--workdir={tmp_path / 'w'}", *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == message
  assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "w")


def test_bad_data_line_is_reported(tmp_path):
  rows = fer_rows(4)
  rows[2] = "3,1 2 3,Training"
  path = write_csv(tmp_path / "bad.csv", rows)
  r = run("experiments.train", f"--data={path}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2
  assert f"error: {path}:4: expected 2304 pixel values (48x48), found 3" in r.stderr
  assert not os.path.exists(tmp_path / "w")  # Nothing written for a failed start.


def test_evaluate_an_ensemble(tmp_path, trained, csv_path):
  workdir, r = trained
  assert r.returncode == 0, r.stderr[-3000:]
  copy = tmp_path / "copy"
  shutil.copytree(os.path.join(workdir, "checkpoints"), copy / "checkpoints")
  out = tmp_path / "ensemble"
  r = run("experiments.evaluate", f"--workdir={workdir},{copy}", f"--output_dir={out}",
          f"--data={csv_path}", "--batch_size=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ensemble(acnn_alstm+acnn_alstm) on PrivateTest" in r.stdout
  ensemble = json.load(open(out / "eval-ensemble-PrivateTest-tta_none.json"))
  members = ensemble["members"]
  assert [m["workdir"] for m in members] == [workdir, str(copy)]
  # Two copies of one run: the ensemble is that run.
  assert ensemble["accuracy"] == members[0]["accuracy"] == members[1]["accuracy"]
  r = run("experiments.evaluate", f"--workdir={workdir},{copy}", f"--data={csv_path}")
  assert r.returncode == 1 and "set --output_dir" in r.stderr


def test_evaluate_can_skip_bad_rows(tmp_path, trained):
  workdir, r = trained
  assert r.returncode == 0, r.stderr[-3000:]
  rows = fer_rows(32, usages=("Training",)) + fer_rows(9, usages=("PublicTest",)) + \
      fer_rows(9, usages=("PrivateTest",))
  rows[-1] = "3,1 2 3,PrivateTest"
  path = write_csv(tmp_path / "bad.csv", rows)
  r = run("experiments.evaluate", f"--workdir={workdir}", f"--data={path}", "--batch_size=8")
  assert r.returncode == 2 and f"error: {path}:51: expected 2304 pixel values" in r.stderr
  out = tmp_path / "out"
  r = run("experiments.evaluate", f"--workdir={workdir}", f"--data={path}", "--batch_size=8",
          "--skip_bad_rows", f"--output_dir={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  [report] = [f for f in os.listdir(out) if f.endswith(".json")]
  assert json.load(open(out / report))["num_examples"] == 8  # 9 PrivateTest rows, one bad.


def test_evaluate_missing_workdir(tmp_path):
  r = run("experiments.evaluate", f"--workdir={tmp_path / 'nothing'}")
  assert r.returncode == 2 and "no such directory" in r.stderr


def test_results_table_rows_come_from_results_json(tmp_path, trained):
  workdir, r = trained
  assert r.returncode == 0, r.stderr[-3000:]
  results = tmp_path / "results"
  results.mkdir()
  result = json.load(open(os.path.join(workdir, "results.json")))
  json.dump(result, open(results / "short-acnn.json", "w"))
  script = tmp_path / "reproduce.sh"
  script.write_text('A="--model=acnn_alstm --epochs=1"\nrun short-acnn $A \\\n  --batch_size=8\n')
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\n<!-- results-table -->\n\nafter\n")
  # Each run compiles the model for XLA's cost analysis (about 20 s on 2 cores); JAX's
  # persistent cache lets the later runs read those programs back. The cells must not change.
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  def table(*args):
    return run("experiments.results_table", f"--results={results}", *args, env=cache)

  from flax import nnx

  from ferjax.models import create_model
  from ferjax.models.summary import count_params
  tiny = create_model("acnn_alstm", num_classes=7, rngs=nnx.Rngs(0),
                      **result["config"]["model_overrides"])
  # The run's device is recorded; a run trained on a GPU names it beside its training time.
  assert result["device"] == {"platform": "cpu", "kind": "cpu", "count": 1}
  mflops = []
  for second in (False, True):  # The tables go to stdout and the README; a second run replaces them.
    if second:
      # Beside the run, for the second table: a copy trained on a GPU; a recalibrated copy
      # (experiments.recalibrate_bn), whose command is the source's training command, then
      # the recalibration; and the same run with another seed: its own row, and one
      # seed-spread row for the two.
      on_gpu = {**result, "device": {"platform": "gpu", "kind": "NVIDIA H100 80GB HBM3",
                                     "count": 1}}
      json.dump(on_gpu, open(results / "short-acnn-gpu.json", "w"))
      json.dump(result, open(results / "short-acnn-bnrecal.json", "w"))
      script.write_text(script.read_text() + "recalibrate short-acnn-bnrecal short-acnn\n")
      repeat = json.loads(json.dumps(result))
      repeat["config"]["seed"] += 1
      repeat["test_tta_none"]["accuracy"] = result["test_tta_none"]["accuracy"] + 0.02
      json.dump(repeat, open(results / "short-acnn-seed1.json", "w"))
    r = table(f"--script={script}", f"--readme={readme}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "#### Every model but vgg_alstm on one short schedule" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| `short-acnn` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{100 * result['test_tta_none']['accuracy']:.2f}"
    assert cells[2] == f"{100 * result['test_tta_flip']['accuracy']:.2f}"
    assert cells[-1] == ("`python -m experiments.train --model=acnn_alstm --epochs=1 "
                         "--batch_size=8 --workdir=runs/short-acnn`")
    # The cost of the run's own (tiny) model, not of the default acnn_alstm (406,375
    # parameters, 92.12 MFLOPs): the run's model options reach the count.
    assert cells[5] == f"{count_params(tiny):,}" and cells[5] != "406,375"
    mflops.append(float(cells[6]))
    assert 0 < mflops[-1] < 5 and mflops[-1] == mflops[0]
    assert cells[8] == f"{result['train_seconds'] / 60:.1f} min"  # Under 10 minutes.
    text = readme.read_text()
    assert text.count(row) == 1 and text.endswith("<!-- /results-table -->\n\nafter\n")
    # The model's cost is compiled once (the copies share it), and says so while the user waits.
    assert r.stderr.count("counting parameters and FLOPs: acnn_alstm") == 1, r.stderr
  gpu_row = next(line for line in r.stdout.splitlines() if line.startswith("| `short-acnn-gpu` |"))
  assert gpu_row.split(" | ")[8] == f"{cells[8]} on NVIDIA H100 80GB HBM3"
  recal_row = next(line for line in r.stdout.splitlines()
                   if line.startswith("| `short-acnn-bnrecal` |"))
  assert recal_row.split(" | ")[-1] == (
      "`python -m experiments.train --model=acnn_alstm --epochs=1 --batch_size=8 "
      "--workdir=runs/short-acnn; python -m experiments.recalibrate_bn "
      "--workdir=runs/short-acnn --output=runs/short-acnn-bnrecal` |")
  names = [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("| `short")]
  assert names[:4] == ["| `short-acnn`", "| `short-acnn-bnrecal`", "| `short-acnn-gpu`",
                       "| `short-acnn-seed1`"]  # In name order: a run, then its repeats.
  spread = next(line for line in r.stdout.splitlines() if line.startswith("| `short-acnn` | 0, 1 |"))
  a = 100 * result["test_tta_none"]["accuracy"]
  assert spread.split(" | ")[2:6] == [f"{a:.2f} / {a + 2:.2f}", f"{a + 1:.2f}",
                                      f"{2 ** 0.5:.2f}", "2.00"]
  f = 100 * result["test_tta_flip"]["accuracy"]  # The same in both seeds: no spread.
  assert spread.split(" | ")[6:10] == [f"{f:.2f} / {f:.2f}", f"{f:.2f}", "0.00", "0.00"]
  assert len(spread.strip("|").split("|")) == 14
  os.remove(results / "short-acnn-gpu.json")
  os.remove(results / "short-acnn-bnrecal.json")
  repeat["config"]["learning_rate"] *= 2  # Not a seed repeat any more: refused, named.
  json.dump(repeat, open(results / "short-acnn-seed1.json", "w"))
  r = table(f"--script={script}")
  assert r.returncode == 2 and "short-acnn-seed1.json: a seed repeat of short-acnn must differ " \
      "only in its seed; it also differs in learning_rate" in r.stderr
  r = table(f"--script={script}", f"--readme={tmp_path / 'nothing.md'}")
  assert r.returncode == 2 and "nothing.md: No such file or directory" in r.stderr
  r = run("experiments.results_table", f"--results={tmp_path / 'empty'}")
  assert r.returncode == 2 and "empty: no <run>.json files there" in r.stderr
  os.remove(results / "short-acnn-seed1.json")
  # Another kind of JSON among the runs (an evaluation's report), or a broken file: named.
  json.dump({"num_examples": 9, "accuracy": 0.5}, open(results / "eval-report.json", "w"))
  r = table(f"--script={script}")
  assert r.returncode == 2 and "eval-report.json: not a training run's results.json" in r.stderr
  (results / "eval-report.json").write_text('{"config": ')
  r = table(f"--script={script}")
  assert r.returncode == 2 and "eval-report.json: cannot read it as JSON" in r.stderr


def test_after_a_reported_error_abandoned_coroutines_print_nothing(monkeypatch):
  # A damaged checkpoint: Orbax's other reads are left pending and, finalised at exit, each
  # printed a traceback under the one-line error. Other unraisable exceptions still show.
  import gc

  from ferjax import cli
  from ferjax.errors import CheckpointError

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)

  @cli.exit_on_errors
  def main():
    raise CheckpointError("damaged")

  with pytest.raises(SystemExit) as exit_info:
    main()
  assert exit_info.value.code == 2

  class Pause:
    def __await__(self):
      yield

  async def pending_read():
    try:
      await Pause()
    finally:
      raise RuntimeError("read failed")  # Raised again when the coroutine is finalised.

  coroutine = pending_read()
  coroutine.send(None)
  del coroutine
  gc.collect()
  assert seen == []

  class BadDel:
    def __del__(self):
      raise RuntimeError("not a coroutine")

  BadDel()
  gc.collect()
  assert len(seen) == 1 and "not a coroutine" in str(seen[0].exc_value)


def test_ctrl_c_in_an_entrypoint_exits_with_status_130(capsys):
  # What the README promises for a video-file or image run cut short with Ctrl-C.
  from ferjax import cli

  @cli.exit_on_errors
  def main():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_info:
    main()
  assert exit_info.value.code == 130
  assert capsys.readouterr().err.strip() == "interrupted"


def test_benchmark_tables_cut_long_names_in_the_middle():
  # The shipped weights' absolute path hid the checkpoint step in predict_latency's table,
  # and clip names lost their extension in tracking's.
  from benchmarks.common import fit

  label = "acnn_alstm (/tmp/checkout/ferjax/weights/default, step 43953)"
  assert len(fit(label, 43)) == 43
  assert fit(label, 43).startswith("acnn_alstm (") and fit(label, 43).endswith("step 43953)")
  assert fit("face-demographics-walking-and-pause.gif", 38).endswith("pause.gif")
  assert fit("short.mkv", 38) == "short.mkv"


def test_train_throughput_times_ferjax_alone_without_pytorch(tmp_path):
  # The benchmark's PyTorch side needs the bench extra; --notorch measures ferjax's step,
  # its FLOPs and share of the peak without it (dnn: the quickest step to compile).
  out = tmp_path / "tt.json"
  r = run("benchmarks.train_throughput", "--notorch", "--models=dnn", "--rounds=1", "--steps=1",
          "--warmup=1", "--peak_sizes=64", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["settings"]["torch"] is False and report["versions"]["torch"] is None
  dnn = report["models"]["dnn"]
  assert dnn["torch_images_per_s"] is None and dnn["jax_over_torch"] is None
  assert dnn["jax_images_per_s"] > 0 and math.isfinite(dnn["jax_mean_loss"])
  # dnn has no loop, so XLA's count is the whole step: about 11.8 GFLOP at batch 64.
  assert dnn["flops_per_step"] == dnn["xla_flops_per_step"] and 10e9 < dnn["flops_per_step"] < 14e9
  assert dnn["jax_gflops_per_s"] == pytest.approx(dnn["flops_per_step"] / 64
                                                  * dnn["jax_images_per_s"] / 1e9)
  row = next(line for line in r.stdout.splitlines() if line.startswith("dnn "))
  assert row.split()[3:5] == ["—", "—"]  # No PyTorch columns.
  if importlib.util.find_spec("torch") is None:
    # Without the extra, the comparison is refused in one line that names the way out.
    r = run("benchmarks.train_throughput", "--models=dnn", f"--out={tmp_path / 'x.json'}")
    assert r.returncode == 2 and not (tmp_path / "x.json").exists()
    assert r.stderr.strip().splitlines()[-1] == (
        'error: PyTorch is not installed: install the bench extra (pip install -e ".[bench]"; '
        'benchmarks/README.md has the CPU-only wheel), or pass --notorch to time ferjax alone')
