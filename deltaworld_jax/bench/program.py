"""The trainer's real train step as a program to compile, with abstract shapes: no weights, no data.

`abstract_setup` mirrors `trainer.build` (same task, same sharding rules, same optimiser, same shardings
of the train state) but builds the FROZEN modules with `nnx.eval_shape` instead of loading and placing
them, so the whole step can be lowered for devices that do not exist here (a TPU topology on a CPU host,
see aot.py). `lower_train_step` then lowers `train_step.make_train_step` + `train_step.jit_train_step`,
the functions the trainer jits, with ShapeDtypeStructs carrying the real shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from deltaworld_jax import sharding as sharding_lib
from deltaworld_jax.training import tasks
from deltaworld_jax.training import train_step as step_lib

# The effective batch of every stage of the published recipe (REFERENCE.md).
EFFECTIVE_BATCH = 1024


def benchmark_config(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
                     accumulation_steps: int | None = None, mesh_shape: dict | None = None,
                     remat: str | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` for benchmarking: frozen modules randomly initialised (no weight files are
    read; FLOPs, time and memory do not depend on the values), optional overrides of the global batch,
    the accumulation, the mesh shape and the remat policy."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    if "vfm" in cfg and "weights" in cfg.vfm:
        cfg.vfm.weights = ""
    if "tokenizer" in cfg and cfg.tokenizer is not None:
        cfg.tokenizer.checkpoint = ""
        cfg.tokenizer.allow_random = True  # world_tasks: a randomly initialised DeltaTok of the same sizes
    if batch_size is not None:
        cfg.train.batch_size = int(batch_size)
    if accumulation_steps is not None:
        cfg.optim.accumulation_steps = int(accumulation_steps)
    if mesh_shape is not None:
        cfg.mesh.shape = dict(mesh_shape)
    if remat is not None:
        cfg.model.remat = remat
    return cfg


@dataclasses.dataclass
class AbstractSetup:
    mesh: Mesh
    task: Any
    graphdef: Any
    abstract_state: step_lib.TrainState
    state_shardings: step_lib.TrainState
    tx: Any
    schedule: Any
    frozen_graphdef: Any
    abstract_frozen: Any  # pure dict of ShapeDtypeStructs
    frozen_shardings: Any
    trainable_module: Any  # the abstract trainable module (for parameter counts)
    frozen_module: Any


def _register_tasks() -> None:
    # task_modules registers every model family (deltatok, deltaworld, dinoworld).
    from deltaworld_jax.training import task_modules  # noqa: F401


def abstract_setup(config, mesh: Mesh) -> AbstractSetup:
    """As `trainer.build(config, mesh)`, with the frozen modules abstract (nothing is allocated)."""
    _register_tasks()
    rules = sharding_lib.axis_rules(config.mesh)
    task = tasks.make_task(config)
    seed = int(config.get("seed", 0))
    # Abstract builds happen OUTSIDE the mesh context: under a mesh, nnx.eval_shape would read the
    # logical axis names (embed, vocab, ...) as mesh axes and fail.
    abstract_module = nnx.eval_shape(lambda: task.build_trainable(nnx.Rngs(seed)))
    frozen_module = nnx.eval_shape(task.build_frozen)
    # The trainer's own layout (train_step.train_state_layout), with no mesh context either: everything is
    # abstract or explicit NamedShardings, and a concrete op under a compile-only (topology) mesh would fail.
    layout = step_lib.train_state_layout(config, abstract_module, mesh, rules)
    frozen_graphdef, abstract_frozen, frozen_shardings = step_lib.split_frozen(frozen_module, mesh, rules)
    return AbstractSetup(mesh, task, layout.graphdef, layout.abstract_state, layout.state_shardings, layout.tx,
                         layout.schedule, frozen_graphdef, abstract_frozen, frozen_shardings, abstract_module,
                         frozen_module)


def batch_shapes(config, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `config` (the data pipeline's batch contract)."""
    b = int(config.train.batch_size if global_batch is None else global_batch)
    t = int(config.data.num_frames)
    h, w = frame_hw(config)
    shapes = {"frames": jax.ShapeDtypeStruct((b, t, h, w, 3), jnp.uint8),
              "timestamps": jax.ShapeDtypeStruct((b, t), jnp.float32)}
    if config.model.kind == "deltaworld" and config.data.get("use_cached_tokens", False):
        width = int(config.tokenizer.get("hidden_size", 0) or config.model.get("backbone_hidden_size", 0) or 768)
        shapes = {"tokens": jax.ShapeDtypeStruct((b, t, width), jnp.float32), "timestamps": shapes["timestamps"]}
    return shapes


def frame_hw(config) -> tuple[int, int]:
    size = config.data.frame_size
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _with_sharding(shapes: dict, mesh: Mesh) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(mesh, len(v.shape)))
            for k, v in shapes.items()}


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_jitted_step(setup: AbstractSetup, config, batch_sharding_tree):
    """The trainer's step function, jitted exactly as the trainer jits it."""
    step_fn = step_lib.make_train_step(setup.task, setup.graphdef, setup.frozen_graphdef, setup.tx,
                                       accumulation_steps=int(config.optim.get("accumulation_steps", 1)),
                                       mesh=setup.mesh, lr_schedule=setup.schedule)
    jitted = step_lib.jit_train_step(step_fn, setup.state_shardings, setup.frozen_shardings,
                                     batch_sharding_tree, setup.mesh)
    return step_fn, jitted


def abstract_step_args(setup: AbstractSetup, config) -> tuple:
    """(state, frozen, batch, key) as ShapeDtypeStructs carrying the trainer's shardings."""
    batch = _with_sharding(batch_shapes(config), setup.mesh)
    state = _abstract(setup.abstract_state, setup.state_shardings)
    frozen = _abstract(setup.abstract_frozen, setup.frozen_shardings)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(setup.mesh))
    return state, frozen, batch, key


def lower_train_step(config, mesh: Mesh):
    """(lowered program, step_fn, abstract args, setup) of the trainer's real step for `config` on `mesh`."""
    setup = abstract_setup(config, mesh)
    args = abstract_step_args(setup, config)
    step_fn, jitted = build_jitted_step(setup, config, jax.tree.map(lambda x: x.sharding, args[2]))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
    return lowered, step_fn, args, setup
