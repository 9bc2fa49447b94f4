"""Weights from our own training runs: the `params` item of an Orbax checkpoint directory written by
training/checkpointing.py, and the model config the trainer records next to it (MODEL_CONFIG). Used for a
stage's weights-only init, our DeltaTok run as DeltaWorld's frozen tokenizer, and forecasting from a run
(`read_run`; the models are built from it by pretrained.deltatok / pretrained.world, under OUR parameter
names: no detour through the official names). Only reads; the trainer's Checkpointer writes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx, traverse_util

from deltaworld_jax.pretrained.common import unstack_layers

PARAMS = "params"  # the checkpoint item holding the trainable parameters
# {"kind": the model family, "config": the trained module's config (a dataclass's fields)}, written by the
# trainer into the checkpoints folder when it starts; runs written before it have none (see read_run).
MODEL_CONFIG = "model_config.json"


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in `directory` (empty if none)."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    steps = list(manager.all_steps())
    manager.close()
    return steps


def _restore_params_item(directory: epath.Path, step: int | None, target: Any = None) -> tuple[int, Any]:
    """(step, the `params` item of that step, latest when None): onto `target` (ShapeDtypeStructs with
    shardings), or as the stored numpy arrays when None."""
    manager = ocp.CheckpointManager(directory, item_handlers={PARAMS: ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint to read weights from in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    finally:
        manager.close()
    return step, restored[PARAMS]


def restore_params(directory: str, abstract_params: Any, shardings: Any, step: int | None = None) -> Any:
    """Weights-only init (stage to stage, or a frozen tokenizer from our own DeltaTok run): only the
    `params` item of another run's checkpoint, placed by `shardings`. Optimiser state and step are NOT
    read: the new run starts at step 0 with a fresh optimiser."""
    step, params = _restore_params_item(epath.Path(directory), step, abstract_like(abstract_params, shardings))
    logging.info("Weights-only init from %s step %d", directory, step)
    return params


def restore_module_params(directory: str, module: Any, step: int | None = None) -> Any:
    """A module with its Params replaced by those of a run's checkpoint (e.g. our own DeltaTok run as
    DeltaWorld's frozen tokenizer); restored onto the default device (the trainer places frozen modules
    itself). `module` may be abstract (nnx.eval_shape) as long as all its state is Params. Shapes must match
    the module's: a mismatch is Orbax's error naming the array."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(rest)):
        raise ValueError(f"{type(module).__name__} has state besides its Params that a checkpoint's params do "
                         "not restore: build it concretely, not with nnx.eval_shape")
    pure = nnx.to_pure_dict(params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_params(directory, pure, jax.tree.map(lambda _: device, pure), step=step)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


# ----------------------------------------------------------------------------------------------------
# A run as a whole: its parameters under our names, and the model config it was trained with
# ----------------------------------------------------------------------------------------------------


def checkpoints_folder(directory: str | epath.Path) -> epath.Path:
    """A run's checkpoints folder from its workdir (holding checkpoints/) or from that folder itself."""
    folder = epath.Path(directory)
    return folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder


def read_model_config(directory: str | epath.Path) -> dict | None:
    """The run's MODEL_CONFIG record ({"kind", "config"}), or None when the run has none."""
    path = checkpoints_folder(directory) / MODEL_CONFIG
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str) or not isinstance(
            record.get("config"), dict):
        raise ValueError(f"{path} is not a model config record ({{'kind': str, 'config': dict}})")
    return record


def config_from_record(cls, record: dict):
    """The dataclass `cls` (DeltaTokConfig, DeltaWorldConfig, ...) from a MODEL_CONFIG record's config (JSON
    lists back to tuples); a field the record lacks keeps its default (records of older code)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in record["config"].items() if k in names})


# What the parameter names of a run without a MODEL_CONFIG record say it holds.
_FAMILY_BY_NAMES = (("world", ("predictor.blocks.",)), ("deltatok", ("z_embed.", "encoder_blocks.", "decoder_blocks.")))


@dataclasses.dataclass(frozen=True)
class Run:
    """The latest checkpoint of one of our training runs.

    params: {dotted parameter path: numpy array} as the run stored them (per-layer `blocks.{i}` or stacked
    `blocks.stacked`); `per_layer_params()` is the per-layer view the loaders fill either layout from.
    record: the trainer's MODEL_CONFIG record, None for runs written before the trainer recorded it (their
    sizes are then read off the parameters)."""

    folder: epath.Path
    step: int
    params: dict[str, np.ndarray]
    record: dict | None

    @property
    def family(self) -> str | None:
        """"deltatok", "deltaworld" or "dinoworld" from the record; without one, "deltatok" or "world" (either
        world model) from the parameter names; None when neither fits."""
        if self.record is not None:
            return self.record["kind"]
        for family, prefixes in _FAMILY_BY_NAMES:
            if any(path.startswith(prefixes) for path in self.params):
                return family
        return None

    def per_layer_params(self) -> dict[str, np.ndarray]:
        return unstack_layers(self.params)


def read_run(directory: str | epath.Path) -> Run | None:
    """The latest checkpoint of the run at `directory` (its workdir or checkpoints folder), read to host
    memory; None when it holds no complete checkpoint."""
    folder = checkpoints_folder(directory)
    if not folder.is_dir() or not checkpoint_steps(str(folder)):
        return None
    step, tree = _restore_params_item(folder, None)
    logging.info("read the weights of %s step %d", folder, step)
    params = {".".join(str(k) for k in path): np.asarray(value)
              for path, value in traverse_util.flatten_dict(tree).items()}
    return Run(folder, step, params, read_model_config(folder))
