r"""Trains a FER model on FER2013 (learn on Training, select on PublicTest, report PrivateTest).

  python -m experiments.train --model=acnn_alstm --data=path/to/fer2013.csv

Running the same command again on the same --workdir resumes from the latest
checkpoint (on a finished run, it prints the report again). Results land in the workdir: checkpoints/, metrics.jsonl,
curves.png, results.json (PrivateTest metrics of the best checkpoint, or with
--swa_epochs of the weight average, written to swa/).
"""

import os

from absl import app, flags

from ferjax import cli, models
from ferjax.config import CLASS_WEIGHTING, LABEL_SETS, OPTIMIZERS

_MODEL = flags.DEFINE_enum("model", "acnn_alstm", models.model_names(), "Model to train.")
_DATA = flags.DEFINE_string(
    "data", None, "FER2013 as fer2013.csv, fer2013.csv.gz, Kaggle's fer2013.tar.gz or an image "
    "folder with train/ and test/. Default: $FER2013_PATH.")
_LABELS = flags.DEFINE_enum("labels", "fer2013", LABEL_SETS,
                            "fer2013 (7 classes) or ferplus (8-class FER+ majority votes).")
_SOFT = flags.DEFINE_bool("soft_targets", None, "With --labels=ferplus: train on the FER+ vote "
                          "distributions instead of the majority labels.")
_DISTILL = flags.DEFINE_string("distill_from", None, "Knowledge distillation: a trained run's "
                               "workdir, or several separated by commas; the best "
                               "checkpoints' predictions on the training images (averaged "
                               "over the runs) are mixed into the targets. Or the "
                               "teacher_predictions.npz that a distilled run saved in its "
                               "workdir: the same targets without the teachers' checkpoints.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Fine-tuning: a trained run's workdir (e.g. "
                                 "ferjax/weights/default) of the same --model and options whose "
                                 "best checkpoint gives the starting weights; a classifier for "
                                 "another label set starts fresh. Optimiser and schedule start "
                                 "afresh.")
_DISTILL_WEIGHT = flags.DEFINE_float("distill_weight", None, "Weight of the teacher's "
                                     "predictions in the targets (0.5).")
_FERPLUS = flags.DEFINE_string("ferplus", None,
                               "fer2013new.csv for --labels=ferplus. Default: $FERPLUS_PATH.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where the run lives. Default: runs/<model>[-ferplus].")
_FRESH = flags.DEFINE_bool("fresh", False, "Move an existing run in --workdir aside "
                           "(renamed, never deleted) and start over.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs over Training. Default: per model.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size. Default: 64.")
_LR = flags.DEFINE_float("learning_rate", None, "Peak learning rate. Default: per model.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, OPTIMIZERS,
                               "adamw, adam or sgd (Nesterov). Default: per model.")
_WD = flags.DEFINE_float("weight_decay", None, "Weight decay on kernels. Default: per model.")
_WARMUP = flags.DEFINE_float("warmup_epochs", None, "Linear warm-up before the cosine decay.")
_CLIP = flags.DEFINE_float("grad_clip", None, "Global gradient-norm clip; 0 turns it off.")
_SMOOTH = flags.DEFINE_float("label_smoothing", None, "Label smoothing. Default: 0.1.")
_WEIGHTING = flags.DEFINE_enum("class_weighting", None, CLASS_WEIGHTING,
                               "Loss weights per class: none, balanced or sqrt.")
_EMA = flags.DEFINE_float("ema_decay", None, "Parameter EMA decay used for evaluation; 0: off.")
_SWA = flags.DEFINE_integer(
    "swa_epochs", None, "Stochastic weight averaging: the last N of --epochs run at the constant "
    "--swa_learning_rate and the weights at the end of each are averaged; the average, its "
    "BatchNorm statistics recomputed on the training faces, is the run's result, written to "
    "<workdir>/swa. Default: 0 (off).")
_SWA_LR = flags.DEFINE_float("swa_learning_rate", None, "With --swa_epochs: the constant "
                             "learning rate of the averaged epochs (where the cosine decay "
                             "ends). Default: --learning_rate / 10.")
_SEED = flags.DEFINE_integer("seed", None, "Seed for initialisation, data order, augmentation "
                             "and dropout. Default: 0.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps (smoke runs).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "Evaluate (and checkpoint) every N "
                                   "steps. Default: once per epoch.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", None, "Also checkpoint every N steps.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch size (256).")
_MODEL_OPTION = flags.DEFINE_multi_string(
    "model_option", [], "Model option as key=value, repeatable, e.g. --model_option=lstm_hidden=256"
    " --model_option=bidirectional=true --model_option='widths=(32,64,128,128)' (quoted for "
    "the shell).")
_AUGMENT = flags.DEFINE_multi_string(
    "augment", [], "Augmentation option as key=value, repeatable: max_shift, flip, max_rotation, "
    "max_scale, erase_prob, erase_area, erase_aspect, mixup_alpha, cutmix_alpha, mix_prob "
    "(ferjax.augment.AugmentConfig). Mixing is off unless an alpha is set.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", None, "Split to learn on. Default: Training "
                                   "(train for image folders).")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "Split that selects the checkpoint. "
                                  "Default: PublicTest (for image folders without it, a held-out "
                                  "tenth of train).")
_TEST_SPLIT = flags.DEFINE_string("test_split", None, "Split to report. Default: PrivateTest "
                                  "(test for image folders).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_rows", False,
                              "Drop malformed data rows (and report them) instead of failing.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run through jax.distributed.initialize(); the "
    "three flags below default to what a cluster (SLURM, Open MPI, Kubernetes, TPU) provides.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "With --distributed: how many processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --distributed: this process's index.", lower_bound=0)


@cli.exit_on_errors
def main(argv):
  cli.start(argv)
  if _DISTRIBUTED.value:
    import jax
    # Collectives between CPU devices of different processes (the CPU back-end has none
    # across hosts otherwise); a GPU or TPU run uses its own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:  # A setting neither the flags nor a cluster manager gave.
      raise app.UsageError(f"--distributed: {str(e).rstrip('.')} (where no cluster manager "
                           "such as SLURM, Open MPI or Kubernetes supplies them, pass "
                           "--coordinator_address, --num_processes and --process_id)") from None
  elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--distributed")
  from ferjax.train import train_and_evaluate  # After flags: keeps --help fast.

  changes = {name: flag.value for name, flag in (
      ("epochs", _EPOCHS), ("batch_size", _BATCH), ("learning_rate", _LR),
      ("optimizer", _OPTIMIZER), ("weight_decay", _WD), ("warmup_epochs", _WARMUP),
      ("grad_clip", _CLIP), ("label_smoothing", _SMOOTH), ("class_weighting", _WEIGHTING),
      ("ema_decay", _EMA), ("swa_epochs", _SWA), ("swa_learning_rate", _SWA_LR),
      ("seed", _SEED), ("max_steps", _MAX_STEPS),
      ("eval_every", _EVAL_EVERY), ("checkpoint_every", _CKPT_EVERY),
      ("eval_batch_size", _EVAL_BATCH), ("soft_targets", _SOFT), ("distill_from", _DISTILL),
      ("distill_weight", _DISTILL_WEIGHT), ("init_from", _INIT_FROM),
      ("train_split", _TRAIN_SPLIT), ("eval_split", _EVAL_SPLIT),
      ("test_split", _TEST_SPLIT)) if flag.value is not None}
  config = cli.train_config(_MODEL.value, labels=_LABELS.value,
                            model_options=_MODEL_OPTION.value, augment_options=_AUGMENT.value,
                            **changes)
  workdir = _WORKDIR.value or f"runs/{config.model}" + ("-ferplus" if config.labels == "ferplus"
                                                         else "")
  results = train_and_evaluate(config, workdir, data_path=_DATA.value,
                               ferplus_path=_FERPLUS.value, fresh=_FRESH.value,
                               on_error="skip" if _SKIP_BAD.value else "raise")
  best = results.get("best_checkpoint", results)
  none, flip = best["test_tta_none"], best["test_tta_flip"]
  ten = best["test_tta_ten_crop"]
  print(f"{config.model}: {results['test_split']} accuracy {none['accuracy']:.2%} "
        f"(flip TTA {flip['accuracy']:.2%}, ten-crop TTA {ten['accuracy']:.2%}), "
        f"macro-F1 {none['macro_f1']:.4f}; "
        f"best checkpoint step {results['best_step']} in {workdir}")
  swa = results.get("swa")
  if swa and swa["count"]:
    none, flip = results["test_tta_none"], results["test_tta_flip"]
    ten = results["test_tta_ten_crop"]
    print(f"{config.model}, average of epochs {swa['epochs'][0]}-{swa['epochs'][-1]}: "
          f"{results['test_split']} accuracy {none['accuracy']:.2%} "
          f"(flip TTA {flip['accuracy']:.2%}, ten-crop TTA {ten['accuracy']:.2%}), "
          f"macro-F1 {none['macro_f1']:.4f}; in {os.path.join(workdir, 'swa')} (the run's "
          "result: evaluate and realtime take it as --workdir)")
    return
  from ferjax.recalibrate import model_has_batch_norm
  if model_has_batch_norm(config.model, results["config"]["model_overrides"]):
    print(f"next: python -m experiments.recalibrate_bn --workdir={workdir} "
          f"--output={workdir.rstrip('/')}-bnrecal  (BatchNorm statistics of unaugmented "
          "faces; README, Training)")


if __name__ == "__main__":
  cli.run(main)
