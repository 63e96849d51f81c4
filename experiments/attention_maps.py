r"""Draws a model's local attention α (6x6 positions) as heat maps over test faces.

  python -m experiments.attention_maps --workdir=runs/acnn_alstm \
      --data=path/to/fer2013.csv --split=PrivateTest --num=32 --output=attention.png

Each face is titled true→predicted label and the prediction's probability.
Only models with local attention (acnn_alstm, vgg_alstm) have α to draw.
"""

from absl import flags

from ferjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir. Default: the "
                               "weights shipped in ferjax/weights/default.")
_WHICH = flags.DEFINE_string("which", "best", "best, latest or a step number.")
flags.DEFINE_alias("checkpoint", "workdir")  # The earlier name of --workdir here.
_DATA = flags.DEFINE_string("data", None, "FER2013 in any supported form. Default: "
                            "$FER2013_PATH.")
_SPLIT = flags.DEFINE_string("split", "PrivateTest", "Split to take faces from.")
_NUM = flags.DEFINE_integer("num", 32, "How many faces (the first of the split).",
                            lower_bound=1)
_COLUMNS = flags.DEFINE_integer("columns", 8, "Faces per row.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", "attention_maps.png", "The PNG to write (.png).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_rows", False, "Drop malformed data rows (and report "
                              "them) instead of failing, as training's flag.")


@cli.exit_on_errors
def main(argv):
  cli.start(argv)
  from ferjax.inference import render_attention_maps

  result = render_attention_maps(_OUTPUT.value, checkpoint=_WORKDIR.value, which=_WHICH.value,
                                 data_path=_DATA.value, split=_SPLIT.value, num=_NUM.value,
                                 columns=_COLUMNS.value,
                                 on_error="skip" if _SKIP_BAD.value else "raise")
  accuracy = "" if result["accuracy"] is None else f", {result['accuracy']:.0%} correct"
  print(f"{result['num']} {result['split']} faces ({result['model']}, step {result['step']}"
        f"{accuracy}); wrote {result['path']}")


if __name__ == "__main__":
  cli.run(main)
