"""Entry point: `python -m deltaworld_jax.main --config=configs/<name>.py --workdir=<dir or gs://...>`.

Runs through the absl app (Grain worker processes need parsed absl flags), initialises jax.distributed
on multi-host runs, and hands the config to the trainer."""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "recipe"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("mode=%s workdir=%s config:\n%s", _MODE.value, _WORKDIR.value, config)
    from deltaworld_jax.training import trainer  # imported late: flags are parsed, jax not yet initialised

    trainer.run(config, _WORKDIR.value, mode=_MODE.value)


if __name__ == "__main__":
    app.run(main)
