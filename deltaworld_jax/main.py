"""Entry point: `python -m deltaworld_jax.main --config=configs/<name>.py[:arg] --workdir=<dir or gs://...>`.

Modes:
  train   (default) train one stage config; a config of stages (configs/demo.py, configs/kinetics.py with
          arg "recipe=...") runs as a recipe
  recipe  run every stage of `config.stages` in order, each in <workdir>/<stage>/; finished stages are
          skipped, the unfinished one resumes (`--stages=a,b` runs only those)
  eval    run `config.eval.fn` once on the latest checkpoint in <workdir>

Runs through the absl app (Grain worker processes need parsed absl flags), initialises jax.distributed
on multi-host runs, and hands the config to the trainer. Override any value with --config.<path>=<value>."""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "recipe"], "What to run.")
_STAGES = flags.DEFINE_list("stages", [], "With a recipe config: run only these stages (in recipe order).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("mode=%s workdir=%s config:\n%s", _MODE.value, _WORKDIR.value, config)
    from deltaworld_jax.training import trainer  # imported late: flags are parsed, jax not yet initialised
    from deltaworld_jax.bench import mfu  # noqa: F401  registers the analytic FLOPs: the trainer logs MFU

    summary = trainer.run(config, _WORKDIR.value, mode=_MODE.value, only_stages=_STAGES.value or None)
    logging.info("Finished: %s", {k: v for k, v in summary.items() if k not in ("setup", "state", "losses")})


if __name__ == "__main__":
    app.run(main)
