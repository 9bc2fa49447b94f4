"""Which evaluation a stage runs: `config.eval.datasets` read, checked and reduced to the sets that have data.

A stage declares its evaluation in `config.eval` (fn, every_steps, datasets, heads, ...; see
evaluation.eval_hook) and the roots of the validation sets in `config.data.eval.<set>.root`. A set without
a root is left out, and a stage whose sets all lack roots trains without evaluation; both are logged with
the reason, so a run never fails at its first evaluation for data it was never given. Sets that ARE given
must exist (`check`, called by trainer.validate_config before anything is built).

Light on purpose (no jax): the trainer's validation and the recipe import it.
"""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath

# Sets eval_hook can read (data.make_eval_iterator); all but 'synthetic' need config.data.eval.<set>.root.
EVAL_SETS = ("vspw", "cityscapes", "kitti", "synthetic")
ROOTED_SETS = ("vspw", "cityscapes", "kitti")


def _section(config, name: str):
    return config.get(name, None) if hasattr(config, "get") else None


def datasets(eval_config) -> tuple[str, ...]:
    """config.eval.datasets as names: a comma-separated string ("vspw,cityscapes,kitti", the command-line
    form) or a sequence; () when the field is absent or empty."""
    value = eval_config.get("datasets", ()) if eval_config is not None and hasattr(eval_config, "get") else ()
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return tuple(str(name).strip() for name in value if str(name).strip())


def _root(config, name: str) -> str:
    data = _section(config, "data")
    sets = _section(data, "eval") if data is not None else None
    entry = _section(sets, name) if sets is not None else None
    return (entry.get("root", "") or "") if entry is not None else ""


def uses_datasets(config) -> bool:
    """True when the stage evaluates periodically through named sets (config.eval.datasets)."""
    eval_config = _section(config, "eval")
    return bool(eval_config is not None and eval_config.get("fn", "") and "datasets" in eval_config)


def check(config) -> None:
    """Raise ValueError naming the field for: an unknown set, a given root / head / split file that does not
    exist. Sets without a root are not errors (they are left out, see `configure`)."""
    if not uses_datasets(config):
        return
    eval_config = config.eval
    names = datasets(eval_config)
    unknown = [name for name in names if name not in EVAL_SETS]
    if unknown:
        raise ValueError(f"config.eval.datasets={eval_config.datasets!r}: unknown set(s) {unknown}; known: "
                         f"{list(EVAL_SETS)} (comma-separated)")
    for name in names:
        root = _root(config, name)
        if name in ROOTED_SETS and root and not epath.Path(root).exists():
            raise ValueError(f"config.data.eval.{name}.root={root!r} does not exist")
    if "kitti" in names and _root(config, "kitti"):
        split = config.data.eval.kitti.get("split_file", "")
        if split and not epath.Path(split).exists():
            raise ValueError(f"config.data.eval.kitti.split_file={split!r} does not exist")
    heads = eval_config.get("heads", None) or {}
    for name, path in dict(heads).items():
        if path and not epath.Path(path).exists():
            raise ValueError(f"config.eval.heads.{name}={path!r} does not exist (a released head's "
                             "pytorch_model.bin, or its folder)")


def active(config) -> tuple[tuple[str, ...], list[str]]:
    """(the sets that will be evaluated, one reason per set left out)."""
    kept, dropped = [], []
    for name in datasets(config.eval):
        if name in ROOTED_SETS and not _root(config, name):
            dropped.append(f"{name}: config.data.eval.{name}.root is empty")
        else:
            kept.append(name)
    return tuple(kept), dropped


def configure(config, stage: str = "") -> Any:
    """The config a stage trains (or evaluates) with: config.eval.datasets reduced to the sets that have data,
    and config.eval.every_steps = 0 when none has (evaluation off). Logs what was left out and why. Configs
    that do not evaluate through named sets are returned unchanged."""
    if not uses_datasets(config):
        return config
    where = f"Stage {stage}: " if stage else ""
    kept, dropped = active(config)
    every = int(config.eval.get("every_steps", 0) or 0)
    if not dropped:
        if kept and every:
            logging.info("%sevaluating %s every %d steps", where, ",".join(kept), every)
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.eval.datasets = ",".join(kept)
        if not kept:
            config.eval.every_steps = 0
    if kept:
        logging.info("%sevaluation on %s every %d steps; left out: %s", where, ",".join(kept), every,
                     "; ".join(dropped))
    else:
        logging.warning("%sevaluation OFF: no validation set has data (%s). Give roots with "
                        "--config.data.eval.<vspw|cityscapes|kitti>.root=...", where, "; ".join(dropped))
    return config
