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

import concurrent.futures
import dataclasses
import json
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

import grain

from deltaworld_jax.training.train_step import TrainState

# Reading a run's weights (weights-only init, our DeltaTok run as a frozen tokenizer) is in pretrained/runs.py.
from deltaworld_jax.pretrained.runs import (  # noqa: F401
    MODEL_CONFIG, PARAMS, abstract_like as _abstract, checkpoint_steps, restore_module_params, restore_params)

TRAIN, DATA_ITER = "train", "data_iter"
CHECKSUMS = "checksums.json"


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
        self._checksummer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._checksummed: set[int] = set()

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
        started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._checksum_finalised(exclude=step)  # the previous save is final now (Orbax waited for it)
        return started

    def _checksum_finalised(self, exclude: int | None = None) -> None:
        """Manifests for the finalised steps without one, in a background thread (process 0 writes)."""
        if jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            if step == exclude or step in self._checksummed:
                continue
            self._checksummed.add(step)
            step_dir = self.directory / str(step)
            if not (step_dir / CHECKSUMS).exists():
                self._checksummer.submit(self._write_checksums_quietly, step_dir)

    @staticmethod
    def _write_checksums_quietly(step_dir: epath.Path) -> None:
        try:
            write_checksums(step_dir)
        except Exception as e:  # pylint: disable=broad-except  (e.g. retention deleted the step meanwhile)
            logging.warning("No checksums for %s: %s", step_dir, e)

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
        other_topology = data_iter is not None and not self._has_iterator_state(step)
        if data_iter is not None and not other_topology:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if other_topology:
            self._restore_iterator_position(step, data_iter)
        train = restored[TRAIN]
        return TrainState(step=train["step"], params=restored[PARAMS], opt_state=train["opt_state"],
                          extra=train["extra"])

    def restore_latest(self, abstract_state: TrainState, shardings: TrainState,
                       data_iter: Any = None) -> TrainState | None:
        """Full resume from the newest checkpoint that restores (None when there is none).

        A newest checkpoint that cannot be read (truncated, deleted or corrupted array file, empty step
        directory, checksum mismatch) must not stop the run forever (a crash loop on an auto-restarting
        pod): the steps are tried newest first, and once an older one restores, every newer one that failed
        is moved aside to `<step>.broken-<time>` (outside Orbax's step naming; nothing is deleted) with a
        warning naming it. When NO step restores (e.g. the config changed the model's shapes) nothing is
        moved and the newest step's error is raised."""
        steps = sorted(self.all_steps(), reverse=True)
        failures: list[tuple[int, str]] = []
        for step in steps:
            error = self._try_restore(step, abstract_state, shardings, data_iter)
            if isinstance(error, str):
                failures.append((step, error))
                logging.warning("Checkpoint step %d in %s does not restore: %s", step, self.directory, error)
                continue
            for broken, reason in failures:
                self._move_aside(broken, reason)
            if failures:
                self._manager.reload()
            logging.info("Resuming from %s step %d", self.directory, step)
            return error
        if failures:
            raise RuntimeError(f"No checkpoint in {self.directory} restores (nothing was moved); newest step "
                               f"{failures[0][0]}: {failures[0][1]}")
        return None

    def _try_restore(self, step: int, abstract_state, shardings, data_iter) -> TrainState | str:
        """The restored state, or the reason it failed (the same answer on every process: process 0 checks
        the checksums, then every process restores)."""
        error = verify_checksums(self.directory / str(step)) if jax.process_index() == 0 else ""
        error = _any_process_error(error, "checksums differ (checked by process 0)")
        if error:
            return error
        state = None
        try:
            state = self.restore(abstract_state, shardings, data_iter=data_iter, step=step)
            jax.block_until_ready(state)
        except Exception as e:  # pylint: disable=broad-except  (any unreadable file: try an older step)
            error = f"{type(e).__name__}: {str(e)[:500]}"
        error = _any_process_error(error, "failed to restore on another process")
        return error if error else state

    def _move_aside(self, step: int, reason: str) -> None:
        target = self.directory / f"{step}.broken-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
            (target / "BROKEN.txt").write_text(f"moved aside when restoring: {reason}\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"move_aside_{step}")
        logging.warning("Checkpoint step %d was unreadable (%s): moved aside to %s; resuming from an older step",
                        step, reason, target)

    def _restore_iterator_position(self, step: int, data_iter: Any) -> None:
        """A checkpoint saved by another number of processes. Iterators whose global batch k does not depend
        on the process count (`topology_independent`, e.g. data.make_train_iterator) continue at global batch
        `step`: nothing replayed, nothing skipped; process 0 takes over the total of the saved skip counts.
        Any other iterator restarts from its first batch, and says so."""
        saved = sorted((self.directory / str(step) / DATA_ITER).glob("process_*-of-*.json"))
        if not getattr(data_iter, "topology_independent", False):
            logging.warning("Checkpoint %d holds the data iterator state of another process count (%s), and this "
                            "data iterator cannot move to a global position: it starts afresh, so its first %d "
                            "batches (those of steps 1..%d) are seen again.", step,
                            [p.name for p in saved] or "none", step, step)
            return
        errors: dict[str, int] = {}
        if jax.process_index() == 0:
            for path in saved:
                for kind, count in json.loads(path.read_text()).get("errors", {}).items():
                    errors[kind] = errors.get(kind, 0) + int(count)
        data_iter.set_state(data_iter.global_state(step, errors))
        logging.info("Checkpoint %d was saved by another process count (%s): the data iterator of process %d of "
                     "%d continues at global batch %d", step, [p.name for p in saved], jax.process_index(),
                     jax.process_count(), step)

    def _has_iterator_state(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / DATA_ITER / name).exists()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._checksum_finalised()
        self._checksummer.shutdown(wait=True)
        self._manager.close()


def _any_process_error(error: str, elsewhere: str) -> str:
    """`error`, or `elsewhere` when only another process failed: all processes take the same decision."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.int32(bool(error)))
    return error or (elsewhere if np.any(failed) else "")


def write_model_config(directory: str, kind: str, model_config: Any) -> None:
    """<directory>/MODEL_CONFIG: the family and the trained module's config (a dataclass), so the run's
    weights can be built into a model later with no other input (pretrained.runs.read_run). Process 0
    writes; the file is replaced whole (a temporary name, then a rename)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "config": dataclasses.asdict(model_config)}
    tmp = directory / f".{MODEL_CONFIG}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(directory / MODEL_CONFIG)


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




# ----------------------------------------------------------------------------------------------------
# Checksums: Orbax/TensorStore do not checksum array data (a flipped byte in the middle of an array file
# restores silently with wrong values), so every finalised step gets a manifest of its files.
# ----------------------------------------------------------------------------------------------------


def _file_crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _step_files(step_dir: epath.Path, prefix: str = "") -> dict[str, epath.Path]:
    files = {}
    for child in step_dir.iterdir():  # (epath has no recursive glob on cloud storage)
        name = f"{prefix}{child.name}"
        if child.is_dir():
            files.update(_step_files(child, name + "/"))
        elif name != CHECKSUMS:
            files[name] = child
    return files


def write_checksums(step_dir) -> None:
    """Write `<step>/checksums.json`: {relative path: [size, crc32]} of every file of a FINALISED step. Written
    under a temporary name and renamed, so a manifest is never half written."""
    step_dir = epath.Path(step_dir)
    manifest = {name: [path.stat().length, _file_crc32(path)] for name, path in sorted(_step_files(step_dir).items())}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(manifest, indent=0))
    tmp.rename(step_dir / CHECKSUMS)


def verify_checksums(step_dir) -> str:
    """'' when the step matches its manifest (or has none: saved by an older version, or killed before the
    manifest was written: restored unverified), else what is wrong (empty step, missing, resized or
    altered file)."""
    step_dir = epath.Path(step_dir)
    if not step_dir.exists() or not any(step_dir.iterdir()):
        return f"step directory {step_dir} is empty"
    manifest_path = step_dir / CHECKSUMS
    if not manifest_path.exists():
        return ""
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        return f"{manifest_path} is unreadable: {e}"
    for name, (size, crc) in manifest.items():
        path = step_dir / name
        if not path.exists():
            return f"file {name} is missing"
        if path.stat().length != size:
            return f"file {name} has {path.stat().length} bytes, {size} were saved"
        if _file_crc32(path) != crc:
            return f"file {name} does not match its checksum (corrupted)"
    return ""
