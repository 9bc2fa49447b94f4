"""The contract (`Task`) between the one trainer and each model family (DeltaTok, DeltaWorld, DINO-World).

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

import dataclasses
from typing import Any, Protocol

import jax
from flax import nnx

from deltaworld_jax.pretrained import build_vfm

Array = jax.Array
Batch = dict[str, Array]


class Task(Protocol):
    name: str

    def build_trainable(self, rngs: nnx.Rngs) -> nnx.Module:
        """The trained module, freshly initialised (the trainer may call this under nnx.eval_shape)."""

    def build_frozen(self) -> Any:
        """Frozen modules (a module, a tuple/dict of modules, or None), loaded from their own weights."""

    # The batch fields `loss` reads (the data pipeline's or the token cache's).
    batch_fields: tuple[str, ...]

    @staticmethod
    def validate(config, mode: str) -> None:
        """Raise ValueError naming the first bad value of what this family reads from `config` (before
        anything is built); mode "eval" skips what only training reads."""

    def loss(self, trainable: nnx.Module, frozen: Any, batch: Batch, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Scalar float32 loss and a dict of scalar metrics. Pure and jittable; `rng` drives every random
        choice (RoPE augmentation, query noise); `frozen` is used under stop_gradient."""


def config_value(config, name: str, default=None):
    """`config.name` of a ConfigDict or a plain dict; None (unset) reads as `default`."""
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def fields_from(cls, config) -> dict[str, Any]:
    """The values `config` (a ConfigDict or dict holding more than `cls`'s fields: `kind`, `dtype`, ...) sets
    for the fields of the dataclass `cls`; unset (None) fields are left out, lists become tuples."""
    values = {f.name: config_value(config, f.name) for f in dataclasses.fields(cls)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}


def vfm_width_and_heads(vfm_config) -> tuple[int, int]:
    """(hidden_size, num_heads) of the VFM a config describes, from an abstract build (nothing allocated;
    with `weights` set, the checkpoint's own config decides, as it does for the frozen VFM itself)."""
    vfm = nnx.eval_shape(lambda: build_vfm(vfm_config))
    return int(vfm.hidden_size), int(vfm.num_heads)
