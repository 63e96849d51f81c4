r"""Prints the layer table (output shapes, parameters, MFLOPs per image) of each model.

  python -m experiments.model_table                 # every registered model
  python -m experiments.model_table --model=vgg_alstm --model_option=lstm_hidden=128

FLOPs come from XLA's cost analysis of the compiled forward pass at batch 1.
"""

from absl import flags

from ferjax import cli, models

_MODEL = flags.DEFINE_multi_enum("model", None, models.model_names(),
                                 "Model(s) to summarise. Default: all.")
_CLASSES = flags.DEFINE_integer("num_classes", 7, "7 for FER2013, 8 for FER+.", lower_bound=2)
_OPTION = flags.DEFINE_multi_string("model_option", [], "Model option key=value (repeatable).")


@cli.exit_on_errors
def main(argv):
  cli.start(argv, runs_model=False)
  from ferjax.errors import ConfigError
  from ferjax.models.summary import summarize

  overrides = cli.parse_options(_OPTION.value, "model_option")
  for name in _MODEL.value or models.model_names():
    try:  # create_model checks each option by name (ConfigError).
      s = summarize(name, _CLASSES.value, **overrides)
    except ConfigError:
      raise
    except (ValueError, TypeError) as e:  # Options that fit one by one but not together.
      options = " ".join(f"{k}={v!r}" for k, v in overrides.items())
      raise ConfigError(f"model {name!r} with options {options}: {e}") from None
    print(f"### `{name}`: {s.params:,} parameters, {s.mflops:.1f} MFLOPs per image\n")
    print(s.markdown() + "\n")


if __name__ == "__main__":
  cli.run(main)
