r"""Evaluates a checkpoint of a training run.

  python -m experiments.evaluate --workdir=runs/acnn_alstm --which=best \
      --split=PrivateTest --tta=flip

Prints accuracy with its 95 % interval, macro-F1, loss, the expected
calibration error, per-class precision/recall/F1 and the confusion matrix, and
writes them as JSON and a confusion-matrix PNG into the workdir.
The model and label set come from the checkpoint.

Several comma-separated workdirs evaluate their ensemble: the average of the
runs' probabilities, each run weighted equally, written to --output_dir:

  python -m experiments.evaluate --workdir=runs/vgg_alstm,runs/acnn_alstm \
      --tta=ten_crop --output_dir=runs/ensemble

--baseline compares one run with another (its best checkpoint) on the same
faces: both accuracies, the faces only one of them gets right, and McNemar's
exact p-value:

  python -m experiments.evaluate --workdir=runs/vgg_alstm-bnrecal \
      --baseline=runs/vgg_alstm

--mistakes=N draws the N most confident wrong answers, with their data rows.
"""

from absl import app, flags

from ferjax import cli
from ferjax.evaluate import TTA_MODES

_WORKDIR = flags.DEFINE_list("workdir", None, "The training run's workdir; several, "
                             "comma-separated, evaluate their ensemble (needs --output_dir).",
                             required=True)
_WHICH = flags.DEFINE_string("which", "best", "Which checkpoint: best, latest or a step number "
                             "(as in realtime and attention_maps).")
flags.DEFINE_alias("checkpoint", "which")  # This entrypoint's earlier name for --which.
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate. Default: the run's test split "
                             "(PrivateTest).")
_TTA = flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation.")
_DATA = flags.DEFINE_string("data", None, "FER2013 in any supported form. Default: "
                            "$FER2013_PATH.")
_FERPLUS = flags.DEFINE_string("ferplus", None, "fer2013new.csv, for runs trained on FER+ "
                               "labels, and for --mistakes of a FER2013 run. Default: "
                               "$FERPLUS_PATH.")
_MODEL = flags.DEFINE_string("model", None, "If set, fail unless the checkpoint is this model.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.",
                              lower_bound=1)
_SKIP_BAD = flags.DEFINE_bool("skip_bad_rows", False, "Drop malformed data rows (and report "
                              "them) instead of failing, as training's flag.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write results. Default: the "
                              "workdir (required for an ensemble).")
_MISTAKES = flags.DEFINE_integer("mistakes", 0, "List the N most confident wrong predictions "
                                 "in the report, with their data rows (the 0-based rows of "
                                 "fer2013.csv; with --ferplus, FER+'s majority for each), "
                                 "and draw the first 256 into <report>-mistakes.png. One "
                                 "--workdir only.", lower_bound=0)
_BASELINE = flags.DEFINE_string("baseline", None, "Another run's workdir to compare with: its "
                                "best checkpoint on this evaluation's faces (this run's data "
                                "and --split) and --tta; the faces only one gets right, "
                                "McNemar's exact p-value. One --workdir only.")


@cli.exit_on_errors
def main(argv):
  cli.start(argv)
  workdirs = _WORKDIR.value
  if not workdirs:
    raise app.UsageError("--workdir is empty; give a training run's workdir, or several "
                         "separated by commas")
  if not all(workdirs):
    raise app.UsageError(f"--workdir={','.join(workdirs)} has an empty name between commas")
  if len(workdirs) > 1 and not _OUTPUT.value:
    raise app.UsageError("--workdir names several runs (an ensemble): set --output_dir for its "
                         "results")
  if len(set(workdirs)) < len(workdirs):
    raise app.UsageError(f"--workdir names a run twice: {','.join(workdirs)}")
  if _BASELINE.value is not None and len(workdirs) > 1:
    raise app.UsageError("--baseline compares one run with another: give --workdir one run, "
                         "not an ensemble")
  if _MISTAKES.value and len(workdirs) > 1:
    raise app.UsageError("--mistakes draws one run's mistakes: give --workdir one run, not an "
                         "ensemble")
  if _BASELINE.value is not None and not _BASELINE.value.strip():
    raise app.UsageError("--baseline is empty; give the workdir of the run to compare with")
  from ferjax.evaluate import (evaluate_checkpoint, evaluate_ensemble, format_comparison,
                               format_metrics)

  common = dict(checkpoint=_WHICH.value, split=_SPLIT.value, tta=_TTA.value,
                data_path=_DATA.value, ferplus_path=_FERPLUS.value, batch_size=_BATCH.value,
                expect_model=_MODEL.value, output_dir=_OUTPUT.value,
                on_error="skip" if _SKIP_BAD.value else "raise")
  if len(workdirs) == 1:
    metrics = evaluate_checkpoint(workdirs[0], baseline=_BASELINE.value,
                                  mistakes=_MISTAKES.value, **common)
    title = f"{metrics['model']} on {metrics['split']} (step {metrics['step']}, " \
        f"tta={metrics['tta']})"
  else:
    metrics = evaluate_ensemble(workdirs, **common)
    for m in metrics["members"]:
      print(f"  {m['model']} ({m['workdir']}, step {m['step']}): accuracy "
            f"{m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.4f}")
    title = f"{metrics['model']} on {metrics['split']} (tta={metrics['tta']})"
  print(format_metrics(metrics, title))
  if "baseline" in metrics:
    print(format_comparison(metrics["baseline"]))
  print("wrote " + ", ".join(metrics["files"]))


if __name__ == "__main__":
  cli.run(main)
