"""Entry point: `python -m deltaworld_jax.main --config=configs/<name>.py[:arg] --workdir=<dir or gs://...>`.

Modes:
  train   (default) train one stage config; a config of stages (configs/demo.py, configs/kinetics.py with
          arg "recipe=...") runs as a recipe
  recipe  run every stage of `config.stages` in order, each in <workdir>/<stage>/; finished stages are
          skipped, the unfinished one resumes (`--stages=a,b` runs only those)
  eval    run `config.eval.fn` once on the latest checkpoint in <workdir>; for a config of stages, on each
          stage's <workdir>/<stage> (`--stages=a,b`: only those)

Runs through the absl app (Grain worker processes need parsed absl flags), initialises jax.distributed
on multi-host runs, and hands the config to the trainer. Override any value with --config.<path>=<value>;
an override of a field the config does not have stops before anything runs, naming the nearest fields."""

from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deltaworld_jax.training.recipe import load_config_file

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "recipe"], "What to run.")
_STAGES = flags.DEFINE_list("stages", [], "With a recipe config: run only these stages (in recipe order).")
flags.mark_flags_as_required(["config", "workdir"])

_OVERRIDE = "--config."


def unknown_field_message(argv) -> str | None:
    """For the first `--config.<path>=...` of argv whose path the config does not have: a message naming it
    and the nearest known fields (difflib). None when every override names a known field."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    try:
        config = load_config_file(spec)
    except Exception:  # noqa: BLE001  (the config itself is broken: absl's own error says how)
        return None
    for arg in argv:
        if not arg.startswith(_OVERRIDE):
            continue
        path = arg[len(_OVERRIDE):].split("=", 1)[0]
        node, where = config, "config"
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else None
            if keys is None:
                return (f"{arg.split('=', 1)[0]}: {where} is a value ({node!r}), not a section with a field "
                        f"{part!r}")
            if part not in keys:
                # The similar names first; failing those, the three least far off.
                close = (difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
                         or difflib.get_close_matches(part, keys, n=3, cutoff=0.0))
                lines = [f"Unknown config field {arg.split('=', 1)[0]}: {where} has no field {part!r}."]
                if close:
                    lines.append(f"Nearest: {', '.join(f'{where}.{name}' for name in close)}")
                lines.append(f"Fields of {where}: {', '.join(sorted(keys))}")
                if where == "config" and "stage_configs" in keys:
                    lines.append("This config is a recipe of stages: override a stage's field with "
                                 "--config.stage_configs.<stage>." + path)
                return "\n".join(lines)
            node, where = node[part], f"{where}.{part}"
    return None


def _parse_flags(argv):
    """absl's flag parsing; an override of an unknown config field (config_flags raises AttributeError /
    KeyError deep inside) becomes one clear message and exit status 2, without a traceback."""
    _configs_importable(argv)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_field_message(argv)
        if message is None:
            raise
        print(f"FATAL: {message}", file=sys.stderr)
        sys.exit(2)


def run(config, workdir: str, mode: str = "train", *, eval_fn=None, data_fn=None, only_stages=None) -> dict:
    """One stage's config goes to the trainer; a config of stages (`config.stages`) to the recipe, which
    runs (or, mode=eval, evaluates) its stages in order, each in <workdir>/<stage>."""
    # Imported late: flags are parsed, jax not yet initialised.
    from deltaworld_jax.training import recipe, trainer

    if not config.get("stages", None):
        return trainer.run(config, workdir, mode=mode, eval_fn=eval_fn, data_fn=data_fn)
    if mode not in trainer.MODES:
        raise ValueError(f"Unknown mode {mode!r}; known: {trainer.MODES}")
    trainer.maybe_initialize_distributed(config)
    if mode == "eval":  # each stage's workdir (or those of only_stages)
        return recipe.evaluate_recipe(config, workdir, eval_fn=eval_fn, only=only_stages)
    # mode train or recipe: a config of stages (e.g. configs/demo.py) trains by running its stages.
    return recipe.run_recipe(config, workdir, eval_fn=eval_fn, data_fn=data_fn, only=only_stages)


def _configs_importable(argv) -> None:
    """A config in a `configs/` package imports its siblings (`from configs import common`): put the folder
    above it on sys.path, so the config works from any working directory."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    folder = os.path.dirname(os.path.abspath(spec.partition(":")[0]))
    if os.path.basename(folder) == "configs" and os.path.exists(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.insert(0, root)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("mode=%s workdir=%s config:\n%s", _MODE.value, _WORKDIR.value, config)
    summary = run(config, _WORKDIR.value, mode=_MODE.value, only_stages=_STAGES.value or None)
    logging.info("Finished: %s", {k: v for k, v in summary.items() if k not in ("setup", "state", "losses")})


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
