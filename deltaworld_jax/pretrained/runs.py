"""Weights from our own training runs: the `params` item of an Orbax checkpoint directory written by
training/checkpointing.py. Used for a stage's weights-only init, our DeltaTok run as DeltaWorld's frozen
tokenizer, and forecasting from a run. Only reads; the trainer's Checkpointer writes."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

PARAMS = "params"  # the checkpoint item holding the trainable parameters


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


def restore_params(directory: str, abstract_params: Any, shardings: Any, step: int | None = None) -> Any:
    """Weights-only init (stage to stage, or a frozen tokenizer from our own DeltaTok run): only the
    `params` item of another run's checkpoint, placed by `shardings`. Optimiser state and step are NOT
    read: the new run starts at step 0 with a fresh optimiser."""
    directory = epath.Path(directory)
    manager = ocp.CheckpointManager(directory, item_handlers={PARAMS: ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint to initialise weights from in {directory}")
    logging.info("Weights-only init from %s step %d", directory, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(abstract_like(abstract_params, shardings))}))
    manager.close()
    return restored[PARAMS]


def restore_module_params(directory: str, module: Any, step: int | None = None) -> Any:
    """A built nnx module with its Params replaced by those of a run's checkpoint (e.g. our own DeltaTok
    run as DeltaWorld's frozen tokenizer); restored onto the default device (the trainer places frozen
    modules itself). Shapes must match the module's: a mismatch is Orbax's error naming the array."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_params(directory, pure, jax.tree.map(lambda _: device, pure), step=step)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
