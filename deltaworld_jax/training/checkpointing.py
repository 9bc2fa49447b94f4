"""Training checkpoints: Orbax CheckpointManager with the train state and the Grain iterator state.

Layout of one checkpoint (`<workdir>/checkpoints/<step>/`), one Orbax item each:
  params     the trainable module's parameters (pure nested dict); all a weights-only init reads
  train      {step, opt_state, extra}: the rest of a full resume
  data_iter  the Grain iterator state, one JSON file per process (grain's own Orbax handler)
Frozen modules (VFM, tokenizer) are never in it: they are loaded from their own weights.

Saves are asynchronous; Orbax writes each checkpoint into a temporary directory and renames it when every
item is complete, so a process killed at any moment (even mid-save) leaves the latest COMPLETE checkpoint
restorable, and the unfinished one is ignored and cleaned up. Retention: the last `keep_last` plus every
step that is a multiple of `keep_period`.

Restoring takes the target shardings of the CURRENT mesh (ShapeDtypeStructs with shardings), so a run
saved on one topology (e.g. 2 processes, FSDP over 8 devices) resumes on another (1 process, 1 device).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

import grain

from deltaworld_jax.training.train_step import TrainState

PARAMS, TRAIN, DATA_ITER = "params", "train", "data_iter"


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Save/restore of full training state + iterator state in `directory`."""

    def __init__(self, directory: str, *, save_every: int, keep_last: int = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        self.save_every = max(1, int(save_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)),
            max_to_keep=keep_last,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                PARAMS: ocp.StandardCheckpointHandler(),
                TRAIN: ocp.StandardCheckpointHandler(),
                DATA_ITER: grain.checkpoint.CheckpointHandler(),
            },
        )

    # --------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_iter: Any = None) -> bool:
        """Save at `state.step` (asynchronously). Returns whether a save started (False if one exists)."""
        step = int(jax.device_get(state.step))
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            TRAIN: ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "extra": state.extra}),
        }
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def should_save(self, step: int) -> bool:
        """Every `save_every` steps (Orbax's own policy would also save the first step of a run)."""
        return step % self.save_every == 0

    def restore(self, abstract_state: TrainState, shardings: TrainState, data_iter: Any = None,
                step: int | None = None) -> TrainState:
        """Full resume: the train state placed by `shardings` (current mesh) and, if given and saved for
        this process layout, the iterator state (restored in place)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        train_abstract = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                          "extra": abstract_state.extra}
        train_shardings = {"step": shardings.step, "opt_state": shardings.opt_state, "extra": shardings.extra}
        items = {
            PARAMS: ocp.args.StandardRestore(_abstract(abstract_state.params, shardings.params)),
            TRAIN: ocp.args.StandardRestore(_abstract(train_abstract, train_shardings)),
        }
        if data_iter is not None:
            if self._has_iterator_state(step):
                items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                logging.warning("Checkpoint %d has no data iterator state for process %d of %d (saved on another "
                                "topology?): the data iterator starts afresh.", step, jax.process_index(),
                                jax.process_count())
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        train = restored[TRAIN]
        return TrainState(step=train["step"], params=restored[PARAMS], opt_state=train["opt_state"],
                          extra=train["extra"])

    def _has_iterator_state(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / DATA_ITER / name).exists()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
        **{PARAMS: ocp.args.StandardRestore(_abstract(abstract_params, shardings))}))
    manager.close()
    return restored[PARAMS]


def restore_module_params(directory: str, module: Any, step: int | None = None) -> Any:
    """A built nnx module with its Params replaced by those of a run's checkpoint (e.g. our own DeltaTok
    run as DeltaWorld's frozen tokenizer); restored onto the default device (the trainer places frozen
    modules itself). Shapes must match the module's: a mismatch is Orbax's error naming the array."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_params(directory, pure, jax.tree.map(lambda _: device, pure), step=step)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def seed_for_resume(source: str, target: str) -> int | None:
    """Full resume from ANOTHER run (a cool-down stage continuing a finished one): copy the source's latest
    complete checkpoint into `target` unless `target` already has checkpoints of its own (then this run
    resumes those). The copy lands under a temporary name and is renamed, so a half-copied checkpoint is
    never seen. Returns the seeded step (None if nothing was copied)."""
    if checkpoint_steps(target):
        return None
    steps = checkpoint_steps(source)
    if not steps:
        raise FileNotFoundError(f"train.resume_from={source!r} has no complete checkpoint")
    step = max(steps)
    target_path = epath.Path(target)
    if jax.process_index() == 0:
        target_path.mkdir(parents=True, exist_ok=True)
        tmp = target_path / f".copy-{step}"
        if tmp.exists():
            tmp.rmtree()
        _copy_tree(epath.Path(source) / str(step), tmp)
        tmp.rename(target_path / str(step))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("seed_for_resume")
    logging.info("Full resume from %s step %d", source, step)
    return step


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            _copy_tree(child, target / child.name)
        else:
            child.copy(target / child.name)


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in `directory` (empty if none)."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    steps = list(manager.all_steps())
    manager.close()
    return steps
