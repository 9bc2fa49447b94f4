"""The one trainer for every model family: `run(config, workdir, mode)`.

What it owns: jax.distributed, the mesh, sharded construction of the trainable module, placement of the
frozen modules, the optimiser, the jitted step, checkpoints (full resume, weights-only init, preemption),
metrics, and the periodic evaluation hook. What a model family provides is a Task (tasks/base.py).

Every bad config value the trainer can check is checked BEFORE anything is built or compiled
(`validate_config`), with an error that names the value.

Evaluation hook: `eval_fn(config, trainable, frozen, step) -> {name: scalar or image array}` every
`config.eval.every_steps` steps, from `run(..., eval_fn=...)` or `config.eval.fn = "module:function"`.
Data: `data_fn(config, process_index=, process_count=) -> iterator of process-local batches` (default
`deltaworld_jax.data.make_train_iterator`); each process reads only its shard of every global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from deltaworld_jax import sharding as sharding_lib, tasks
from deltaworld_jax.training import checkpointing, metrics as metrics_lib, mfu as mfu_lib
from deltaworld_jax.training import train_step as step_lib

MODES = ("train", "eval", "recipe")


# ----------------------------------------------------------------------------------------------------
# Distributed set-up and validation
# ----------------------------------------------------------------------------------------------------


def maybe_initialize_distributed(config=None) -> None:
    """jax.distributed.initialize on multi-process runs (config.distributed.* or the JAX_* / cloud env);
    a no-op for a single process. CPU collectives go through gloo so multi-process CPU runs work."""
    if config is not None and hasattr(config, "get") and config.get("stages", None):
        config = config.stage_configs[config.stages[0]]  # a recipe: every stage runs on the same processes
    dist = config.get("distributed", None) if config is not None and hasattr(config, "get") else None
    coordinator = (dist.get("coordinator_address", "") if dist else "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = int((dist.get("num_processes", 0) if dist else 0) or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
    on_cloud = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    # Cloud TPU VMs (tpu-vm create / queued resources) set none of those: JAX finds the workers through the
    # metadata server. Their TPU chips show up as /dev/accel* (v4, v5e) or /dev/vfio/<n> (v5p, v6e).
    on_cloud = on_cloud or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if not coordinator and num_processes <= 1 and not on_cloud:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        process_id = int((dist.get("process_id", -1) if dist else -1))
        if process_id < 0:
            process_id = int(os.environ.get("JAX_PROCESS_ID", 0))
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def validate_data(config) -> None:
    """The training source (config.data.source / root) and the validation sets (evaluation/setup.py):
    a ValueError naming the value, before anything is built. Configs without data.source (a test's own
    data_fn) are not checked."""
    from deltaworld_jax.data.config import TRAIN_SOURCES
    from deltaworld_jax.evaluation import setup as eval_setup

    data = config.get("data", None)
    if data is not None and "source" in data:
        source, root = data.source, data.get("root", "") or ""
        if source not in TRAIN_SOURCES:
            raise ValueError(f"config.data.source={source!r} is not a known source; known: {', '.join(TRAIN_SOURCES)}")
        token_cache = data.get("token_cache", "") or ""
        if token_cache and not token_cache.startswith("@"):
            from deltaworld_jax.data.token_cache import INDEX

            cached = (epath.Path(token_cache) / INDEX).exists()  # DeltaWorld then never reads the source
        else:
            cached = False
        if source != "synthetic" and not cached:
            what = ("the folder written by `python -m deltaworld_jax.data.prepare`" if source == "arrayrecord" else
                    "the TFDS data_dir holding config.data.tfds_name" if source == "tfds" else
                    "the folder of the training videos" if source == "videos" else "the folder of frame folders")
            if not root:
                raise ValueError(f"config.data.root is empty: the {source!r} source reads {what} "
                                 "(--config.data.root=...)")
            if not epath.Path(root).exists():
                raise ValueError(f"config.data.root={root!r} does not exist (source {source!r}: {what})")
            if source == "arrayrecord" and not list(epath.Path(root).glob("*.array_record")):
                raise ValueError(f"config.data.root={root!r} holds no *.array_record shards: it is not {what}")
    eval_setup.check(config)


def validate_config(config, num_devices: int | None = None, mode: str = "train") -> None:
    """Check every value the trainer depends on before any build or compile; raise ValueError naming it.
    mode="eval" skips what only training reads (the source run to start from, the training data)."""
    task_class = tasks.task_class(config)
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = dict(zip(sharding_lib.MESH_AXES, sharding_lib.resolve_mesh_shape(dict(config.mesh.shape), num_devices)))
    sharding_lib.axis_rules(config.mesh)
    dp = sizes["data"] * sizes["fsdp"]
    accumulation = int(config.optim.get("accumulation_steps", 1))
    batch = int(config.train.batch_size)
    if accumulation < 1:
        raise ValueError(f"config.optim.accumulation_steps must be >= 1, got {accumulation}")
    if batch <= 0 or batch % (dp * accumulation):
        raise ValueError(f"config.train.batch_size={batch} (the global batch) is not divisible by data-parallel "
                         f"size {dp} x accumulation_steps {accumulation} = {dp * accumulation}")
    if batch % jax.process_count():
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the {jax.process_count()} processes")
    if int(config.train.num_steps) <= 0:
        raise ValueError(f"config.train.num_steps must be positive, got {config.train.num_steps}")
    profile = (int(config.train.get("profile_steps", 0)), int(config.train.get("profile_after_steps", 5)))
    if min(profile) < 0:
        raise ValueError(f"config.train.profile_steps and profile_after_steps must be >= 0, got {profile}")
    optim = config.optim
    if not optim.lr > 0:
        raise ValueError(f"config.optim.lr must be positive, got {optim.lr}")
    if optim.warmup_steps < 0 or optim.weight_decay < 0 or optim.grad_clip_norm < 0:
        raise ValueError("config.optim warmup_steps, weight_decay and grad_clip_norm must be >= 0, got "
                         f"{optim.warmup_steps}, {optim.weight_decay}, {optim.grad_clip_norm}")
    if int(optim.get("max_consecutive_nonfinite", 10)) < 1:
        raise ValueError(f"config.optim.max_consecutive_nonfinite must be >= 1, got {optim.max_consecutive_nonfinite}")
    # What only this model family reads (e.g. DeltaWorld's frozen tokenizer); a Task without its own checks
    # (a test's toy task) has none.
    getattr(task_class, "validate", lambda config, mode: None)(config, mode)
    if mode == "eval":
        from deltaworld_jax.evaluation import setup as eval_setup

        eval_setup.check(config)
        return
    required = config.train.get("required_source", "")
    if required and not config.train.get(required, ""):
        raise ValueError(f"This stage continues another run: set config.train.{required} to its checkpoints "
                         f"directory ({'weights only' if required == 'init_from' else 'full resume'})")
    for key in ("init_from", "resume_from"):
        source = config.train.get(key, "")
        if source and not epath.Path(source).exists():
            raise ValueError(f"config.train.{key}={source!r} does not exist")
    if config.train.get("init_from", "") and config.train.get("resume_from", ""):
        raise ValueError("config.train.init_from (weights only) and resume_from (full state) exclude each other")
    validate_data(config)


# ----------------------------------------------------------------------------------------------------
# State construction
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything built for training (before the loop)."""

    mesh: Any
    rules: Any
    task: Any
    graphdef: Any
    abstract_state: step_lib.TrainState
    state_shardings: step_lib.TrainState
    tx: Any
    schedule: Any
    frozen_graphdef: Any
    frozen_state: Any  # placed arrays; ShapeDtypeStructs when built with abstract_frozen
    frozen_shardings: Any
    abstract_module: Any  # the trainable module's abstract build (shapes, parameter counts, FLOPs)


def build(config, mesh=None, *, abstract_frozen: bool = False) -> Setup:
    """Mesh, task, abstract + sharded train state layout, optimiser and placed frozen modules. The train
    state itself is created by `init_state` (fresh) or restored from a checkpoint.

    abstract_frozen: the frozen modules too are only shapes (nnx.eval_shape: nothing loaded, nothing placed,
    no mesh context), so the whole step can be lowered for devices that do not exist here (aot.py)."""
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding_lib.axis_rules(config.mesh)
    # config.model.remat (none | full | dots_saveable | ...; unset: block_stack.DEFAULT_REMAT) is a model option:
    # the task's model config carries it to the blocks (models/block_stack.run_blocks).
    task = tasks.make_task(config)
    seed = int(config.seed)
    # Abstract shapes outside the mesh context: shardings come from OUR rules (sharding.py), not from
    # Flax's eager per-variable sharding.
    abstract_module = nnx.eval_shape(lambda: task.build_trainable(nnx.Rngs(seed)))
    if abstract_frozen:
        # No mesh context either: everything is abstract or explicit NamedShardings, and a concrete op under
        # a compile-only (topology) mesh would fail.
        layout = step_lib.train_state_layout(config, abstract_module, mesh, rules)
        frozen_graphdef, frozen_state, frozen_shardings = step_lib.split_frozen(
            nnx.eval_shape(task.build_frozen), mesh, rules)
    else:
        # The frozen modules too are built (or loaded: DINOv3 weights, a DeltaTok checkpoint) outside the mesh
        # context. Inside it, Flax's eager sharding reads their LOGICAL axis names ('embed', ...) as mesh axes
        # and the loaders' abstract builds fail. Their placement comes from our rules below.
        frozen_module = task.build_frozen()
        with jax.set_mesh(mesh):
            layout = step_lib.train_state_layout(config, abstract_module, mesh, rules)
            frozen_graphdef, frozen_host, frozen_shardings = step_lib.split_frozen(frozen_module, mesh, rules)
            frozen_state = jax.device_put(frozen_host, frozen_shardings)
    return Setup(mesh, rules, task, layout.graphdef, layout.abstract_state, layout.state_shardings, layout.tx,
                 layout.schedule, frozen_graphdef, frozen_state, frozen_shardings, abstract_module)


def init_state(config, setup: Setup, params: Any = None) -> step_lib.TrainState:
    """A fresh train state, built directly sharded (jitted init with out_shardings). `params` (already
    placed, e.g. from a weights-only init) replaces the freshly initialised parameters."""
    seed = int(config.seed)

    def fresh():
        module = setup.task.build_trainable(nnx.Rngs(seed))
        _, p, e = step_lib.split_trainable(module)
        return step_lib.init_train_state(p, e, setup.tx)

    def from_params(p):
        module = setup.task.build_trainable(nnx.Rngs(seed))
        _, _, e = step_lib.split_trainable(module)
        return step_lib.init_train_state(p, e, setup.tx)

    with jax.set_mesh(setup.mesh):
        if params is None:
            return jax.jit(fresh, out_shardings=setup.state_shardings)()
        return jax.jit(from_params, in_shardings=(setup.state_shardings.params,),
                       out_shardings=setup.state_shardings)(params)


def trainable_module(setup: Setup, state: step_lib.TrainState) -> nnx.Module:
    return nnx.merge(setup.graphdef, state.params, state.extra)


def frozen_modules(setup: Setup) -> Any:
    return None if setup.frozen_graphdef is None else nnx.merge(setup.frozen_graphdef, setup.frozen_state)


# ----------------------------------------------------------------------------------------------------
# Data and hooks
# ----------------------------------------------------------------------------------------------------


def default_data_fn(config, *, process_index: int, process_count: int):
    """The data engineer's pipeline: this process's shard of every global batch, resumable. With
    config.data.token_cache set, DeltaWorld's batches are precomputed delta tokens read from that folder."""
    from deltaworld_jax import data

    if config.data.get("token_cache", ""):
        if not getattr(tasks.task_class(config), "trains_from_tokens", False):
            raise ValueError(f"config.data.token_cache is set but config.model.kind={config.model.kind!r}: only "
                             "DeltaWorld trains from precomputed delta tokens")
        from deltaworld_jax.data import token_cache

        return token_cache.token_data_fn(config, process_index=process_index, process_count=process_count)
    return data.make_train_iterator(config.data, seed=int(config.seed),
                                    batch_size_per_process=int(config.train.batch_size) // process_count,
                                    process_index=process_index, process_count=process_count)


def resolve_eval_fn(config, eval_fn: Callable | None) -> Callable | None:
    if eval_fn is not None:
        return eval_fn
    name = config.get("eval", {}).get("fn", "") if config.get("eval", None) else ""
    if not name:
        return None
    module_name, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"config.eval.fn={name!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def place_batch(batch: dict, mesh) -> dict:
    """Process-local numpy batch -> global arrays split over (data, fsdp)."""
    from deltaworld_jax.data import placement

    return placement.place_batch(batch, mesh, data_axes=sharding_lib.BATCH_AXES)


def data_counters(data_iter) -> dict[str, float]:
    """The loader's running counts of skipped inputs by kind (`TrainIterator.errors`), if it keeps them."""
    errors = getattr(data_iter, "errors", None) or {}
    return {f"data/skipped_{kind}": float(count) for kind, count in errors.items()}


class _Preemption:
    """SIGTERM -> every process saves at the SAME step and stops.

    A scheduler (SLURM, GKE, spot VMs) may deliver SIGTERM to all processes or to ONE. Each process raises
    a local flag; once per step all processes agree on "did ANY process ask to stop" through a tiny
    collective (the max of the per-process flags over the global mesh). The collective of step i is
    dispatched at step i and read back at step i+1, so it never stalls the device queue, and every process
    reads the same value at the same step: all stop together, one step after the first signal.
    (JAX's own preemption sync point never fires once a Python SIGTERM handler is installed.)"""

    def __init__(self, mesh=None):
        self.requested = False
        self._previous = None
        self._pending = None
        self._mesh = mesh
        self._agree = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def _any_process(self, flag: bool):
        """Dispatch max over processes of `flag` (a replicated device scalar; not read back here)."""
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = self._mesh
        sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        local = np.full((len(mesh.local_devices),), int(flag), np.int32)
        flags = jax.make_array_from_process_local_data(sharding, local, (mesh.devices.size,))
        if self._agree is None:
            self._agree = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))
        return self._agree(flags)

    def reached(self, step: int) -> bool:
        """Call exactly once per step on every process. True when the processes agree to stop now."""
        del step
        if jax.process_count() == 1 or self._mesh is None:
            return self.requested
        previous, self._pending = self._pending, self._any_process(self.requested)
        return previous is not None and bool(jax.device_get(previous))

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def run(config, workdir: str, mode: str = "train", *, eval_fn: Callable | None = None,
        data_fn: Callable | None = None) -> dict:
    """Train or evaluate one stage's config (a config of stages is training/recipe.py's; deltaworld_jax.main
    dispatches). Returns a summary."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; known: {MODES}")
    if config.get("stages", None):
        raise ValueError("This config is a recipe of stages (config.stages): run it with `python -m "
                         "deltaworld_jax.main` (or training.recipe.run_recipe / evaluate_recipe)")
    maybe_initialize_distributed(config)
    if mode == "recipe":
        raise ValueError("mode=recipe needs a config of stages (config.stages), e.g. "
                         "configs/kinetics.py:recipe=all; this config is one stage: use mode=train")
    validate_config(config, mode=mode)
    if mode == "eval":
        return evaluate(config, workdir, eval_fn=eval_fn)
    from deltaworld_jax.evaluation import setup as eval_setup

    return train(eval_setup.configure(config), workdir, eval_fn=eval_fn, data_fn=data_fn)


def _checkpointer(config, workdir) -> checkpointing.Checkpointer:
    ckpt = config.checkpoint
    return checkpointing.Checkpointer(str(epath.Path(workdir) / "checkpoints"), save_every=ckpt.every_steps,
                                      keep_last=ckpt.keep_last, keep_period=ckpt.get("keep_period", None),
                                      async_save=ckpt.get("async_save", True))


def evaluate(config, workdir: str, *, eval_fn: Callable | None = None) -> dict:
    """Run the evaluation hook once on the latest checkpoint of `workdir`."""
    from deltaworld_jax.evaluation import setup as eval_setup

    eval_fn = resolve_eval_fn(config, eval_fn)
    if eval_fn is None:
        raise ValueError("mode=eval needs an evaluation function: config.eval.fn='module:function'")
    if eval_setup.uses_datasets(config):
        kept, dropped = eval_setup.active(config)
        if not kept:
            raise ValueError(f"mode=eval: no validation set has data ({'; '.join(dropped)}); give roots with "
                             "--config.data.eval.<vspw|cityscapes|kitti>.root=...")
        config = eval_setup.configure(config)
    steps = checkpointing.checkpoint_steps(str(epath.Path(workdir) / "checkpoints"))
    if not steps:
        raise ValueError(f"mode=eval: no checkpoint in {epath.Path(workdir) / 'checkpoints'} (train there first, "
                         "or point --workdir at a run)")
    setup = build(config)
    checkpointer = _checkpointer(config, workdir)
    state = checkpointer.restore(setup.abstract_state, setup.state_shardings)
    checkpointer.close()
    step = int(jax.device_get(state.step))
    results = eval_fn(config, trainable_module(setup, state), frozen_modules(setup), step)
    writer = metrics_lib.create_writer(str(epath.Path(workdir) / "eval"))
    _write_eval(writer, step, results)
    writer.flush()
    return {"step": step, "eval": results}


def _write_eval(writer, step: int, results: dict) -> None:
    scalars = {f"eval/{k}": float(v) for k, v in results.items() if np.ndim(v) == 0}
    images = {f"eval/{k}": np.asarray(v) for k, v in results.items() if np.ndim(v) >= 3}
    if scalars:
        writer.write_scalars(step, scalars)
    if images:
        writer.write_images(step, {k: v if v.ndim == 4 else v[None] for k, v in images.items()})


def _compile_step(step_fn, setup: Setup, state, batch, base_key):
    """Compile the step ahead of its first call, then wait for every process: compile times differ between
    hosts, and the first collective (e.g. gloo's context set-up on CPU) must not time out waiting."""
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    jitted = step_lib.jit_train_step(step_fn, setup.state_shardings, setup.frozen_shardings, batch_shardings,
                                     setup.mesh, with_apply=True)
    compiled = jitted.lower(state, setup.frozen_state, batch, base_key, _APPLY).compile()
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(f"train_step_compiled_{int(jax.device_get(state.step))}")
    return compiled


_APPLY, _CHECK = np.bool_(True), np.bool_(False)  # the step's `apply`: update, or only evaluate the state


def _trains_finite(jitted, setup: Setup, state, batch, base_key):
    """(state, ok): does `state` give a finite loss and gradient on `batch`? The same compiled step with
    apply=False (no update; one extra forward/backward per checkpoint). A state whose own loss is non-finite
    (e.g. parameters blown up to 1e29 by a finite but huge update) is never saved: resuming it would fail."""
    state, check = jitted(state, setup.frozen_state, batch, base_key, _CHECK)
    loss, norm = (float(v) for v in jax.device_get((check["loss"], check["grad_norm/total"])))
    return state, bool(np.isfinite(loss) and np.isfinite(norm))


def compilation_cache_dir(config, workdir) -> str:
    """Where the persistent compilation cache lives: config.train.compilation_cache ('' disables; relative
    paths are under the workdir). JAX_COMPILATION_CACHE_DIR or an already configured cache win."""
    value = config.train.get("compilation_cache", "jax_cache")
    if not value:
        return ""
    if "://" in value or os.path.isabs(value):
        return value
    return str(epath.Path(workdir) / value)


def enable_compilation_cache(config, workdir) -> str:
    """Turn JAX's persistent compilation cache on for this run (restarts then load the compiled step instead
    of compiling it again). Returns the directory in use ('' when off)."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured  # set by the caller (JAX_COMPILATION_CACHE_DIR, a test session, another stage)
    path = compilation_cache_dir(config, workdir)
    if path:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # an earlier compile in this process may have found no cache: look again
        logging.info("Persistent compilation cache: %s", path)
    return path


def train(config, workdir: str, *, eval_fn: Callable | None = None, data_fn: Callable | None = None) -> dict:
    """The training loop. Resumes from the latest checkpoint in `workdir` that restores (a broken newest one
    is moved aside, see checkpointing.Checkpointer.restore_latest), else initialises (from
    `config.train.init_from`'s weights when set). Returns {'step', 'losses' (host floats by step), ...}."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(config, workdir)
    eval_fn = resolve_eval_fn(config, eval_fn)
    data_fn = data_fn or default_data_fn
    num_steps = int(config.train.num_steps)
    log_every = int(config.train.log_every_steps)

    setup = build(config)
    if config.train.get("resume_from", ""):
        checkpointing.seed_for_resume(config.train.resume_from, str(workdir / "checkpoints"))
    checkpointer = _checkpointer(config, workdir)
    # What the checkpoints hold, so the run's weights build a model with no other input (the forecast).
    model_config = getattr(setup.abstract_module, "cfg", None)
    if dataclasses.is_dataclass(model_config):
        checkpointing.write_model_config(str(workdir / "checkpoints"), setup.task.name, model_config)
    data_iter = data_fn(config, process_index=jax.process_index(), process_count=jax.process_count())
    state = checkpointer.restore_latest(setup.abstract_state, setup.state_shardings, data_iter=data_iter)
    if state is None and config.train.get("init_from", ""):
        params = checkpointing.restore_params(config.train.init_from, setup.abstract_state.params,
                                              setup.state_shardings.params)
        state = init_state(config, setup, params)
    elif state is None:
        state = init_state(config, setup)

    step_fn = step_lib.make_train_step(setup.task, setup.graphdef, setup.frozen_graphdef, setup.tx,
                                       accumulation_steps=int(config.optim.get("accumulation_steps", 1)),
                                       mesh=setup.mesh, lr_schedule=setup.schedule)
    base_key = jax.random.PRNGKey(int(config.seed) + 1)  # the init uses config.seed itself
    writer = metrics_lib.create_writer(str(workdir), enabled=config.train.get("write_metrics", True))
    progress = metrics_lib.create_progress(num_steps, writer, every_steps=log_every)
    buffer = metrics_lib.MetricBuffer()
    nonfinite = metrics_lib.NonFiniteCounter(int(config.optim.get("max_consecutive_nonfinite", 10)))
    preemption = _Preemption(setup.mesh)
    step = int(jax.device_get(state.step))
    start_step = step
    profiler = metrics_lib.create_profiler(config, str(workdir), first_step=start_step)
    losses: dict[int, float] = {}
    jitted = None
    batch = None
    mfu = mfu_lib.MFUMeter.for_training(config, setup.mesh, trainable_module(setup, state), frozen_modules(setup))
    last_log_time, last_log_step = time.time(), step
    stopped_by = "done" if step >= num_steps else None

    def read_back():
        steps, values = buffer.flush()
        losses.update({s: float(v) for s, v in zip(steps, values.get("loss", ()))})
        nonfinite.update(steps, values)  # raises after too many non-finite updates in a row
        return steps, values

    def save():
        nonlocal state
        state, ok = _trains_finite(jitted, setup, state, batch, base_key)
        if ok:
            checkpointer.save(state, data_iter)
        else:
            logging.error("The state at step %d gives a non-finite loss or gradient on its last batch: NOT "
                          "saved; the last good checkpoint is kept", step)

    try:
        with jax.set_mesh(setup.mesh):
            while step < num_steps:
                if preemption.reached(step):
                    stopped_by = "preempted"
                    break
                batch = place_batch(next(data_iter), setup.mesh)
                if jitted is None:
                    jitted = _compile_step(step_fn, setup, state, batch, base_key)
                state, step_metrics = jitted(state, setup.frozen_state, batch, base_key, _APPLY)
                step += 1
                buffer.add(step, step_metrics)
                will_save = checkpointer.should_save(step) or step == num_steps
                if step % log_every == 0 or will_save:
                    # Reading the metrics back is the only host sync per log period.
                    steps, values = read_back()
                    now = time.time()
                    rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    scalars = {k: float(v[-1]) for k, v in values.items()}
                    finite_losses = values["loss"][np.isfinite(values["loss"])]
                    scalars["loss"] = float(np.mean(finite_losses)) if finite_losses.size else float("nan")
                    scalars["nonfinite_skipped_total"] = float(nonfinite.total)
                    scalars["steps_per_second"] = rate
                    scalars["examples_per_second"] = rate * int(config.train.batch_size)
                    scalars.update(mfu(rate))  # model TFLOP/s, and MFU where the device's peak is known
                    scalars.update(data_counters(data_iter))
                    writer.write_scalars(step, scalars)
                if will_save:
                    save()
                progress(step)
                if profiler is not None:
                    profiler(step)
                if eval_fn is not None and config.eval.every_steps and step % config.eval.every_steps == 0:
                    results = eval_fn(config, trainable_module(setup, state), frozen_modules(setup), step)
                    _write_eval(writer, step, results)
            else:
                stopped_by = stopped_by or "done"
        if stopped_by == "preempted" and step > start_step:
            read_back()
            with jax.set_mesh(setup.mesh):
                save()
    finally:
        if profiler is not None:
            profiler.close()
        preemption.restore()
        checkpointer.close()  # waits for the in-flight save: the last good checkpoint is complete
        writer.flush()
    logging.info("Training stopped at step %d (%s); %d non-finite update(s) skipped", step, stopped_by,
                 nonfinite.total)
    return {"step": step, "losses": losses, "stopped_by": stopped_by, "counters": data_counters(data_iter),
            "nonfinite_skipped": nonfinite.total, "setup": setup, "state": state}
