"""The training recipe: `--mode=recipe`, which runs every stage of a config in order (the trainer's config
defaults are configs/common.py).

A recipe config has `config.stages`: an ordered list of stage names, and `config.stage_configs[name]`:
the FULL config of each stage (built by the config file, e.g. configs/kinetics.py). Each stage trains in
`<workdir>/<stage name>/`, so every stage resumes on its own: rerunning the recipe after an interruption
skips the stages whose final step is reached (their checkpoint at `train.num_steps` exists) and resumes
the unfinished one. How a stage starts from the previous one is part of its config:
  train.init_from = "@<stage>"   weights-only init from that stage's final checkpoint (fresh optimiser,
                                 step 0), e.g. DeltaTok 256px -> 512px
  train.resume_from = "@<stage>" full resume (params, optimiser state, step counter, data iterator) from
                                 it, e.g. the lr cool-downs, whose num_steps continue the count
  tokenizer.checkpoint = "@<stage>"  a DeltaTok stage's checkpoints as DeltaWorld's frozen tokenizer
  eval.results_dir = "@" / "@<stage>"  the recipe's workdir / that stage's directory
  data.token_cache = "@<name>"   the folder <workdir>/<name> of precomputed delta tokens, written with the
                                 stage's own frozen VFM + tokenizer before the stage trains if it does not
                                 exist yet (DeltaWorld then trains from tokens alone; data/token_cache.py)
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import ml_collections
from absl import logging
from etils import epath

STAGE_REF = "@"


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `path[:arg]`, as `--config=` (ml_collections' config_flags) loads it: the module at `path`
    is executed and its `get_config(arg)` (`get_config()` without an arg) returned. For the entry point's
    own checks and the benchmarks, which read config files outside absl's flag parsing."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_deltaworld_config_file", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def stage_dir(workdir: str, stage: str) -> epath.Path:
    return epath.Path(workdir) / stage


def final_step_reached(workdir: str, num_steps: int) -> bool:
    """A stage is finished when its checkpoint at its final step exists (complete: Orbax only lists
    finalised checkpoints)."""
    from deltaworld_jax.training import checkpointing

    return num_steps in checkpointing.checkpoint_steps(str(epath.Path(workdir) / "checkpoints"))


def resolve_stage_refs(stage_config, workdir: str) -> ml_collections.ConfigDict:
    """Replace '@<stage>' references by that stage's checkpoints directory under `workdir`."""
    config = stage_config.copy_and_resolve_references()
    with config.unlocked():
        for section, key in (("train", "init_from"), ("train", "resume_from"), ("tokenizer", "checkpoint")):
            if section in config and key in config[section]:
                value = config[section][key]
                if isinstance(value, str) and value.startswith(STAGE_REF):
                    config[section][key] = str(stage_dir(workdir, value[1:]) / "checkpoints")
        # data.token_cache: "@<name>" is the folder <workdir>/<name> (not a stage: the cache of this stage).
        token_cache = config.data.get("token_cache", "") if "data" in config else ""
        if isinstance(token_cache, str) and token_cache.startswith(STAGE_REF):
            if not token_cache[1:]:
                raise ValueError("data.token_cache='@' must name a folder under the workdir, e.g. '@tokens'")
            config.data.token_cache = str(stage_dir(workdir, token_cache[1:]))
        # eval.results_dir: "@" is the recipe's workdir, "@<stage>" that stage's folder (where the demo
        # writes its results table and pictures; the config file cannot know the --workdir flag).
        results_dir = config.eval.get("results_dir", "") if "eval" in config else ""
        if isinstance(results_dir, str) and results_dir.startswith(STAGE_REF):
            name = results_dir[1:]
            config.eval.results_dir = str(stage_dir(workdir, name) if name else epath.Path(workdir))
    return config


# Config values that may name an earlier stage ('@<stage>'); validated before any stage runs.
CHECKPOINT_REFS = (("train", "init_from"), ("train", "resume_from"), ("tokenizer", "checkpoint"))
DIRECTORY_REFS = (("eval", "results_dir"),)


def validate_recipe(config) -> None:
    stages = list(config.get("stages", ()))
    if not stages:
        raise ValueError("mode=recipe needs config.stages (an ordered list of stage names)")
    for name in stages:
        if name not in config.stage_configs:
            raise ValueError(f"Unknown stage {name!r} in config.stages; defined: {sorted(config.stage_configs)}")
        stage = config.stage_configs[name]
        for section, key in CHECKPOINT_REFS + DIRECTORY_REFS:
            value = stage.get(section, {}).get(key, "") if stage.get(section, None) else ""
            if isinstance(value, str) and value.startswith(STAGE_REF) and value != STAGE_REF:
                ref = value[1:]
                if ref not in stages or stages.index(ref) >= stages.index(name):
                    raise ValueError(f"Stage {name!r}: {section}.{key}={value!r} must name an EARLIER stage of "
                                     f"{stages}")


def run_recipe(config, workdir: str, *, eval_fn: Callable | None = None, data_fn: Callable | None = None,
               only: Any = None) -> dict:
    """Train every stage of `config.stages` in order (or just those in `only`); skip finished ones."""
    from deltaworld_jax.evaluation import setup as eval_setup
    from deltaworld_jax.training import trainer

    validate_recipe(config)
    _check_only(config, only)
    # Every stage's data (training source, validation sets) before the first stage trains: a bad root of
    # the last stage must not surface days later.
    for name in config.stages:
        if not only or name in only:
            try:
                trainer.validate_data(config.stage_configs[name])
            except ValueError as error:
                raise ValueError(f"Stage {name}: {error} (override: --config.stage_configs.{name}.<field>=...)") from None
    results = {}
    for name in config.stages:
        if only and name not in only:
            continue
        stage_config = eval_setup.configure(resolve_stage_refs(config.stage_configs[name], workdir), name)
        out = stage_dir(workdir, name)
        num_steps = int(stage_config.train.num_steps)
        if final_step_reached(str(out), num_steps):
            logging.info("Stage %s: final step %d reached, skipped", name, num_steps)
            results[name] = {"skipped": True, "step": num_steps}
            continue
        logging.info("Stage %s: training in %s", name, out)
        trainer.validate_config(stage_config)
        ensure_token_cache(stage_config)
        summary = trainer.train(stage_config, str(out), eval_fn=eval_fn, data_fn=data_fn)
        results[name] = {"skipped": False, "step": summary["step"], "stopped_by": summary["stopped_by"]}
        if summary["stopped_by"] != "done":
            break  # preempted: the next invocation resumes this stage
    return results


def _check_only(config, only) -> None:
    unknown = [name for name in (only or ()) if name not in config.stages]
    if unknown:
        raise ValueError(f"--stages names {unknown}, not stages of this config: {list(config.stages)}")


def evaluate_recipe(config, workdir: str, *, eval_fn: Callable | None = None, only: Any = None) -> dict:
    """`--mode=eval` on a config of stages: each stage's evaluation (its config.eval) once, on the latest
    checkpoint of <workdir>/<stage> (or only the stages in `only`). A stage that declares no evaluation,
    has no checkpoint yet, or has no validation data is skipped with the reason logged, unless `only` names
    it (then that is an error); nothing to evaluate at all is an error listing every reason."""
    from deltaworld_jax.evaluation import setup as eval_setup
    from deltaworld_jax.training import checkpointing, trainer

    validate_recipe(config)
    _check_only(config, only)
    results, skipped = {}, {}
    for name in config.stages:
        if only and name not in only:
            continue
        stage_config = resolve_stage_refs(config.stage_configs[name], workdir)
        out = stage_dir(workdir, name)
        reason = None
        if eval_fn is None and trainer.resolve_eval_fn(stage_config, None) is None:
            reason = "declares no evaluation (config.eval.fn is empty)"
        elif not checkpointing.checkpoint_steps(str(out / "checkpoints")):
            reason = f"no checkpoint in {out / 'checkpoints'}"
        elif eval_setup.uses_datasets(stage_config) and not eval_setup.active(stage_config)[0]:
            reason = "no validation set has data (" + "; ".join(eval_setup.active(stage_config)[1]) + ")"
        if reason:
            if only:
                raise ValueError(f"Stage {name}: cannot evaluate: {reason}")
            logging.info("Stage %s: not evaluated: %s", name, reason)
            skipped[name] = reason
            continue
        logging.info("Stage %s: evaluating %s", name, out)
        trainer.validate_config(stage_config, mode="eval")
        summary = trainer.evaluate(stage_config, str(out), eval_fn=eval_fn)
        scalars = {k: v for k, v in summary["eval"].items() if getattr(v, "ndim", 0) == 0}  # no pictures
        results[name] = {"step": summary["step"], "eval": scalars}
    if not results:
        raise ValueError("mode=eval: no stage could be evaluated: " +
                         "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    return {"stages": results, "skipped": skipped}


def ensure_token_cache(stage_config) -> None:
    """Write the stage's token cache (config.data.token_cache) when it does not exist yet. Process 0
    writes; every process waits for it. The index is written last, so an interrupted write is redone."""
    path = stage_config.get("data", {}).get("token_cache", "") if stage_config.get("data", None) else ""
    if not path:
        return
    from deltaworld_jax.data import token_cache

    if (epath.Path(path) / token_cache.INDEX).exists():
        return
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        clips = int(stage_config.data.get("token_cache_clips", 0)) or None
        logging.info("Writing the token cache %s (%s videos of the training source)", path, clips or "all")
        from deltaworld_jax import tasks

        frozen = tasks.make_task(stage_config).build_frozen()  # DeltaWorld's: {"vfm": ..., "tokenizer": ...}
        summary = token_cache.write_token_cache(stage_config, path, frozen["vfm"], frozen["tokenizer"],
                                                num_clips=clips)
        logging.info("%s", token_cache.format_summary(summary))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"token cache {path}")
