r"""Evaluates a checkpoint of a training run.

  python -m experiments.evaluate --workdir=runs/acnn_alstm --checkpoint=best \
      --split=PrivateTest --tta=flip

Prints accuracy, macro-F1, per-class precision/recall/F1 and the confusion
matrix, and writes them as JSON and a confusion-matrix PNG into the workdir.
The model and label set come from the checkpoint.
"""

from absl import app, flags

from ferjax import cli, hostmem
from ferjax.evaluate import TTA_MODES

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate. Default: the run's test split "
                             "(PrivateTest).")
_TTA = flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation.")
_DATA = flags.DEFINE_string("data", None, "FER2013 in any supported form. Default: "
                            "$FER2013_PATH.")
_FERPLUS = flags.DEFINE_string("ferplus", None, "fer2013new.csv, for runs trained on FER+ "
                               "labels. Default: $FERPLUS_PATH.")
_MODEL = flags.DEFINE_string("model", None, "If set, fail unless the checkpoint is this model.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write results. Default: workdir.")


@cli.exit_on_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  hostmem.retain_freed_memory()  # Before JAX starts (see ferjax/hostmem.py).
  cli.setup_logging()
  from ferjax.evaluate import evaluate_checkpoint, format_metrics

  metrics = evaluate_checkpoint(
      _WORKDIR.value, checkpoint=_CHECKPOINT.value, split=_SPLIT.value, tta=_TTA.value,
      data_path=_DATA.value, ferplus_path=_FERPLUS.value, batch_size=_BATCH.value,
      expect_model=_MODEL.value, output_dir=_OUTPUT.value)
  print(format_metrics(metrics, f"{metrics['model']} on {metrics['split']} "
                       f"(step {metrics['step']}, tta={metrics['tta']})"))
  print("wrote " + ", ".join(metrics["files"]))


if __name__ == "__main__":
  app.run(main)
