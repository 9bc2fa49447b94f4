"""Rematerialisation of transformer blocks as a config switch: `config.model.remat`.

  none                  keep every activation for the backward pass (the default; no recompute)
  full                  keep only each block's input; recompute the block in the backward pass
  dots_saveable         keep the matmul outputs, recompute the elementwise work (norms, activations, ...)
  dots_with_no_batch_dims_saveable   keep only matmuls without batch dims (the weight matmuls), recompute
                        attention's batched QK^T / AV and the elementwise work

The models do not know about remat (models/ stays free of training concerns). `apply(task, config)`
wraps a Task so that the modules it builds have every transformer block (layers.Block: DINOv3, DeltaTok;
predictor.PredictorBlock: DeltaWorld, DINO-World) run under `nnx.remat` with the chosen policy. It swaps
each block's class for a subclass whose __call__ is checkpointed, so parameters, names, shapes and
shardings are untouched (a checkpoint written with one policy loads with any other).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from deltaworld_jax.models import layers

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_types() -> tuple[type, ...]:
    from deltaworld_jax.models.predictor import PredictorBlock

    return (layers.Block, PredictorBlock)


@functools.lru_cache(maxsize=None)
def _remat_class(base: type, policy_name: str) -> type:
    policy = POLICIES[policy_name]

    def __call__(self, *args, **kwargs):
        # Everything but the module travels by closure: rope tables, masks and positions are arrays or
        # None, and `implementation` strings are not valid jax.checkpoint arguments.
        def run(module):
            return base.__call__(module, *args, **kwargs)

        return nnx.remat(run, policy=policy, prevent_cse=True)(self)

    return type(f"Remat{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__,
                                                    "remat_policy": policy_name})


def remat_blocks(module, policy_name: str):
    """Put every transformer block of `module` (in place) under the remat policy; returns the module."""
    if policy_name not in POLICIES:
        raise ValueError(f"Unknown remat policy {policy_name!r}; known: {sorted(POLICIES)}")
    if policy_name == "none" or module is None:
        return module
    types = _block_types()
    for _, node in nnx.iter_graph(module):
        if isinstance(node, types) and not hasattr(type(node), "remat_policy"):
            node.__class__ = _remat_class(type(node), policy_name)
    return module


def policy_of(config) -> str:
    model = config.model
    name = model.get("remat", "none") if hasattr(model, "get") else getattr(model, "remat", "none")
    name = name or "none"
    if name not in POLICIES:
        raise ValueError(f"config.model.remat={name!r}; known: {sorted(POLICIES)}")
    return name


class RematTask:
    """A Task whose trainable module's blocks run under a remat policy (frozen modules: no backward,
    nothing to remat)."""

    def __init__(self, task, policy_name: str):
        self._task = task
        self.policy_name = policy_name
        self.name = getattr(task, "name", type(task).__name__)

    def build_trainable(self, rngs):
        return remat_blocks(self._task.build_trainable(rngs), self.policy_name)

    def build_frozen(self):
        return self._task.build_frozen()

    def loss(self, trainable, frozen, batch, rng):
        return self._task.loss(trainable, frozen, batch, rng)

    def __getattr__(self, name):
        return getattr(self._task, name)


def apply(task, config):
    """`task` itself when config.model.remat is "none" (or absent), else a RematTask."""
    policy_name = policy_of(config)
    return task if policy_name == "none" else RematTask(task, policy_name)
