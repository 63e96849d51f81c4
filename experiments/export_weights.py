r"""Writes an inference-only copy of a run's best checkpoint (no optimiser state).

  python -m experiments.export_weights --workdir=runs/acnn_alstm --output=/tmp/acnn_weights

``--which`` picks another checkpoint (latest or a step number). ``--output`` is
a new folder: an existing one is refused. The output loads like a workdir:
``Predictor("out")``, ``--workdir=out``.
"""

from absl import flags

from ferjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create.", required=True)
_WHICH = flags.DEFINE_string("which", "best", "best, latest or a step number.")
flags.DEFINE_alias("checkpoint", "which")  # The earlier name of --which here.


@cli.exit_on_errors
def main(argv):
  cli.start(argv, runs_model=False)
  from ferjax.checkpoint import export_model

  meta = export_model(_WORKDIR.value, _OUTPUT.value, _WHICH.value)
  print(f"exported {meta['model']} step {meta['step']} to {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
