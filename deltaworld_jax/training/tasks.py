"""The contract between the one trainer and each model family (DeltaTok, DeltaWorld, DINO-World).

A Task says how to build the TRAINABLE module (the only thing the optimiser and the training checkpoint
see), how to build/load the FROZEN modules (VFM; the tokenizer when training the world model), and the
loss of one batch. The trainer owns everything else: mesh, optimiser, jit, accumulation, checkpoints,
logging. Tasks know nothing of optimisers or files beyond loading their frozen weights.

Batches are dicts of arrays:
  frames      uint8 [B, T, H, W, 3]     (channels last)
  timestamps  float32 [B, T]            seconds, relative to the clip's first frame
  tokens      float32 [B, T, D]         (optional) precomputed delta tokens, for the cached-token path
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
from flax import nnx

Array = jax.Array
Batch = dict[str, Array]


class Task(Protocol):
    name: str

    def build_trainable(self, rngs: nnx.Rngs) -> nnx.Module:
        """The trained module, freshly initialised (the trainer may call this under nnx.eval_shape)."""

    def build_frozen(self) -> Any:
        """Frozen modules (a module, a tuple/dict of modules, or None), loaded from their own weights."""

    def loss(self, trainable: nnx.Module, frozen: Any, batch: Batch, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Scalar float32 loss and a dict of scalar metrics. Pure and jittable; `rng` drives every random
        choice (RoPE augmentation, query noise); `frozen` is used under stop_gradient."""


_REGISTRY: dict[str, Callable[[Any], Task]] = {}


def register(kind: str):
    """Decorator: register a factory `config -> Task` under `config.model.kind == kind`."""

    def wrap(factory):
        _REGISTRY[kind] = factory
        return factory

    return wrap


def make_task(config) -> Task:
    """The Task for `config.model.kind`."""
    # Importing the task modules registers them; they import the models, which import nothing from here.
    from deltaworld_jax.training import task_modules  # noqa: F401

    kind = config.model.kind
    if kind not in _REGISTRY:
        raise ValueError(f"Unknown model kind {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](config)
