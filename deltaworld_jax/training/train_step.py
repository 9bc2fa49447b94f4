"""The train state and the one jitted training step shared by every model family.

The trainable module travels through jit as (graphdef, pure-dict state) via nnx.split / nnx.merge; the
frozen modules travel as a separate (graphdef, state) argument that is never differentiated, never donated,
never seen by the optimiser. One call of the step is ONE optimiser update: the global batch is split into
`accumulation_steps` micro-batches inside the step (a lax.scan), so the effective batch is
per-device micro-batch x data-parallel devices x accumulation steps.

Randomness: the step's key is fold_in(base_key, step) and micro-batch i uses fold_in(that, i), so a run
resumed at step s draws exactly the randomness of the uninterrupted run.

Non-finite updates are skipped INSIDE the step: when the loss, the gradient norm or any updated parameter is
not finite, the step keeps the old parameters and optimiser state (the step counter still advances, so the
data position and randomness stay those of the uninterrupted run) and reports metric `nonfinite` = 1. A
poisoned state is therefore never produced by the step; the trainer counts the skips and stops after
`optim.max_consecutive_nonfinite` in a row. `apply=False` evaluates loss and gradient of the state WITHOUT
updating it (step unchanged): the trainer's check that a state it is about to save trains finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltaworld_jax import sharding as sharding_lib
from deltaworld_jax.training import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
    """Everything a full resume restores (besides the data iterator). Pure pytrees: checkpoint friendly."""

    step: jax.Array  # int32 scalar: optimiser updates applied so far
    params: dict  # nnx.Param variables of the trainable module (pure nested dict)
    opt_state: Any  # optax state over `params` only
    extra: dict  # other variables of the trainable module (buffers), usually empty


def split_trainable(module: nnx.Module):
    """(graphdef, params pure dict, extra pure dict) of the trainable module."""
    graphdef, params, extra = nnx.split(module, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def _microbatches(batch: dict, accumulation: int, mesh: Mesh | None) -> dict:
    """[B, ...] -> [B/A, A, ...]: micro-batch i is [:, i] (= batch[i::A]; `_microbatch` restores its shape),
    so each device's contiguous block of the batch yields its share of every micro-batch without any
    communication. Only the leading dim is split, never transposed: on TPU an array whose minor dim is the
    3 colour channels is laid out padded to the 128 lanes, and a transposed copy of DINO-World's uint8
    512px clips took 32 GiB per device that way.

    The trailing dims are kept (the split is then a bitcast of the batch) unless each device's share of a
    micro-batch is a single example; then they are flattened ([B/A, A, prod(...)]). Measured on the 512px
    stages for TPU v5e:2x2 (benchmarks/RESULTS.md): flattening made XLA copy the chip's frames into another
    layout, 11.64 GiB per chip for DeltaWorld at 2 per chip against 6.05 GiB unflattened; but with a unit
    per-device dim the unflattened split let XLA propagate the model's padded frame layout back to the
    whole batch (a 32 GiB copy at 1 per chip, DINO-World and DeltaWorld alike), which flattening walls off."""
    ways = 1 if mesh is None else sharding_lib.batch_ways(mesh)

    def split(x):
        b = x.shape[0]
        if b % accumulation:
            raise ValueError(f"batch dim {b} is not divisible by accumulation_steps={accumulation}")
        micro = b // accumulation
        keep_dims = micro % ways == 0 and micro // ways > 1  # at least 2 examples per device
        x = x.reshape((micro, accumulation) + (x.shape[1:] if keep_dims else (-1,)))
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES)))
        return x

    return jax.tree.map(split, batch)


def _microbatch(micro: dict, batch: dict, index) -> dict:
    """Micro-batch `index` of `_microbatches(batch, ...)`, in the shapes of `batch`'s leaves: [B/A, ...]."""
    return jax.tree.map(lambda m, x: jax.lax.dynamic_index_in_dim(m, index, axis=1, keepdims=False)
                        .reshape((m.shape[0],) + x.shape[1:]), micro, batch)


def make_train_step(
    task,
    graphdef: nnx.GraphDef,
    frozen_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    accumulation_steps: int = 1,
    mesh: Mesh | None = None,
    lr_schedule: optax.Schedule | None = None,
) -> Callable:
    """step(state, frozen_state, batch, base_key, apply=True) -> (new_state, metrics). Pure; jit it (see
    `jit_train_step`).

    metrics: loss (mean over micro-batches), lr (of this update), grad_norm/total and grad_norm/<child>
    (before clipping, like the official logging), nonfinite (1.0 when this update was skipped because the
    loss, gradient or updated parameters were not finite), and every metric the task returns (averaged)."""

    def loss_fn(params, extra, frozen_state, micro, rng):
        trainable = nnx.merge(graphdef, params, extra)
        frozen = None if frozen_graphdef is None else nnx.merge(frozen_graphdef, frozen_state)
        loss, aux = task.loss(trainable, frozen, micro, rng)
        return loss.astype(jnp.float32), aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    platform = sharding_lib.current_platform(mesh)  # the step's target (AOT: TPU, traced on a CPU host)

    def step(state: TrainState, frozen_state, batch: dict, base_key: jax.Array, apply: Any = True):
        step_key = jax.random.fold_in(base_key, state.step)
        frozen_state = jax.lax.stop_gradient(frozen_state)
        if accumulation_steps == 1:
            (loss, aux), grads = grad_fn(state.params, state.extra, frozen_state, batch,
                                         jax.random.fold_in(step_key, 0))
        else:
            micro = _microbatches(batch, accumulation_steps, mesh)

            def body(carry, index):
                grads_sum, loss_sum, aux_sum = carry
                one = _microbatch(micro, batch, index)
                (l, a), g = grad_fn(state.params, state.extra, frozen_state, one,
                                    jax.random.fold_in(step_key, index))
                grads_sum = jax.tree.map(jnp.add, grads_sum, g)
                aux_sum = jax.tree.map(lambda s, v: s + jnp.asarray(v, jnp.float32), aux_sum, a)
                return (grads_sum, loss_sum + l, aux_sum), None

            aux_shape = jax.eval_shape(
                lambda: loss_fn(state.params, state.extra, frozen_state, _microbatch(micro, batch, 0),
                                step_key)[1])
            zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape)
            zeros_grads = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, aux), _ = jax.lax.scan(
                body, (zeros_grads, jnp.zeros((), jnp.float32), zeros_aux),
                jnp.arange(accumulation_steps))
            scale = 1.0 / accumulation_steps
            grads = jax.tree.map(lambda g: g * scale, grads)
            loss = loss * scale
            aux = jax.tree.map(lambda v: v * scale, aux)

        count = optimizer_lib.update_count(state.opt_state)
        lr = jnp.float32(jnp.nan) if lr_schedule is None else jnp.asarray(lr_schedule(count), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        norms = optimizer_lib.global_norm_by_module(grads)
        metrics = {"loss": loss, "lr": lr, **{f"grad_norm/{k}": v for k, v in norms.items()},
                   **{f"task/{k}": jnp.asarray(v, jnp.float32) for k, v in aux.items()}}
        finite = jnp.isfinite(loss) & jnp.isfinite(norms["total"]) & all_finite(params)
        take = finite & jnp.asarray(apply, bool)
        params, opt_state = keep_if(take, (params, opt_state), (state.params, state.opt_state), platform)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + jnp.asarray(apply, jnp.int32), params=params,
                                  opt_state=opt_state)
        return new_state, metrics

    return step


def keep_if(take: jax.Array, new: Any, old: Any, platform: str) -> Any:
    """`new` where the scalar `take` is true, else `old` (a skipped update keeps the old state).

    On TPU and GPU a select per leaf: XLA fuses the choice into each leaf's update (the tiny DeltaTok
    step's AOT program for v5e: 0 bytes of temporaries; with a cond, 9.4 MB). XLA:CPU instead copies the
    scalar and-reduction behind `take` (one per leaf of all_finite) into EVERY leaf's select fusion: the
    side-by-side DeltaTok step carried it 188 x ~570 times (107k of its 281k HLO lines) and compiled in
    66 s; with one cond, 62k lines and 26 s, the same temporaries and results. So CPU takes a cond."""
    if platform == "cpu":
        return jax.lax.cond(take, lambda: new, lambda: old)
    return jax.tree.map(lambda n, o: jnp.where(take, n, o), new, old)


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every floating leaf of `tree` is finite (a large finite value, e.g. a
    parameter of 1e29, is finite: its global norm would overflow, the elements do not)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def jit_train_step(step_fn: Callable, state_shardings: Any, frozen_shardings: Any, batch_shardings: Any,
                   mesh: Mesh, with_apply: bool = False) -> Callable:
    """jit with the train state donated, its shardings pinned on the way in and out, metrics replicated.
    `with_apply`: the jitted function takes the step's 5th argument `apply` (a bool scalar) as well."""
    repl = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, repl) + ((repl,) if with_apply else ()),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )


def init_train_state(params: dict, extra: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra)


# ----------------------------------------------------------------------------------------------------
# The layout of a train state (abstract shapes + shardings): shared by the trainer and the AOT benchmarks
# ----------------------------------------------------------------------------------------------------


def optax_shardings(tx, abstract_opt_state, param_shardings, replicated):
    """Shardings of the optimiser state: moments follow their parameter, counters are replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)


@dataclasses.dataclass
class StateLayout:
    graphdef: Any  # of the trainable module
    abstract_state: TrainState  # ShapeDtypeStructs
    state_shardings: TrainState
    tx: optax.GradientTransformation
    schedule: Callable


def train_state_layout(config, abstract_module: nnx.Module, mesh: Mesh, rules) -> StateLayout:
    """Abstract train state of `abstract_module` (from nnx.eval_shape), its shardings under `rules`, and the
    optimiser of `config.optim` (weight decay only on the module's Linear/Conv kernels). Allocates nothing."""
    repl = sharding_lib.replicated(mesh)
    graphdef, abstract_params, abstract_extra = nnx.split(abstract_module, nnx.Param, ...)
    param_shardings = sharding_lib.pure_shardings(abstract_params, mesh, rules)
    extra_shardings = sharding_lib.pure_shardings(abstract_extra, mesh, rules)
    tx = optimizer_lib.make_optimizer(config.optim, optimizer_lib.weight_decay_mask(abstract_module))
    schedule = optimizer_lib.learning_rate_schedule(config.optim.lr, config.optim.warmup_steps)
    abstract_state = jax.eval_shape(
        lambda: init_train_state(nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(abstract_extra), tx))
    opt_shardings = optax_shardings(tx, abstract_state.opt_state, param_shardings, repl)
    state_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, extra=extra_shardings)
    return StateLayout(graphdef, abstract_state, state_shardings, tx, schedule)


def split_frozen(frozen_module, mesh: Mesh, rules):
    """(graphdef, pure dict of its variables, their shardings) of the frozen modules; ({}, {}) parts for None."""
    if frozen_module is None:
        return None, {}, {}
    graphdef, variables = nnx.split(frozen_module)
    return graphdef, nnx.to_pure_dict(variables), sharding_lib.pure_shardings(variables, mesh, rules)
