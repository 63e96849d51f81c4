r"""Recomputes a trained run's BatchNorm statistics on its training faces, unaugmented.

  python -m experiments.recalibrate_bn --workdir=runs/vgg_alstm --output=runs/vgg_alstm-bnrecal

Training leaves BatchNorm with statistics of augmented faces from its last few
dozen steps; this replaces them with the mean of the batch statistics over the
whole training split as it is (no augmentation, no dropout; about a minute on a
CPU). Parameters are unchanged. It prints the eval split's accuracy before and
after, and writes ``--output`` (a new folder; an existing one is refused): an
inference checkpoint that evaluate, realtime and ``Predictor`` read like a
workdir, and a results.json like a training run's, with the test split's
metrics (plain and with each TTA). The run itself is left untouched.
"""

from absl import flags

from ferjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create for the recalibrated model.",
                              required=True)
_WHICH = flags.DEFINE_string("which", "best", "Which checkpoint: best, latest or a step number.")
_DATA = flags.DEFINE_string("data", None, "FER2013 in any supported form (the run's data). "
                            "Default: $FER2013_PATH.")
_FERPLUS = flags.DEFINE_string("ferplus", None, "fer2013new.csv, for runs trained on FER+ "
                               "labels. Default: $FERPLUS_PATH.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Faces per batch for the statistics.",
                              lower_bound=1)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 256, "Evaluation batch size.",
                                   lower_bound=1)
_SKIP_BAD = flags.DEFINE_bool("skip_bad_rows", False, "Drop malformed data rows (and report "
                              "them) instead of failing, as training's flag.")


@cli.exit_on_errors
def main(argv):
  cli.start(argv)
  from ferjax.recalibrate import recalibrate_run

  results = recalibrate_run(_WORKDIR.value, _OUTPUT.value, which=_WHICH.value,
                            data_path=_DATA.value, ferplus_path=_FERPLUS.value,
                            batch_size=_BATCH.value, eval_batch_size=_EVAL_BATCH.value,
                            on_error="skip" if _SKIP_BAD.value else "raise")
  r = results["batch_norm_recalibration"]
  print(f"{results['model']} step {r['step']}: {r['eval_split']} accuracy "
        f"{r['eval_accuracy_before']:.2%} as trained, {r['eval_accuracy_after']:.2%} "
        f"recalibrated on {r['faces']:,} {r['split']} faces")
  print(f"{results['test_split']}: " + ", ".join(
      f"{results[f'test_tta_{tta}']['accuracy']:.2%} ({tta})"
      for tta in ("none", "flip", "ten_crop")))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
