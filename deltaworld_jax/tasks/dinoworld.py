"""DINO-World training (config.model.kind == "dinoworld"): the discriminative baseline that predicts the
frozen VFM's features directly (tasks/world.py has what it shares with DeltaWorld)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
from deltaworld_jax.tasks.world import WorldTask, check_frames

Array = jax.Array


class DINOWorldTask(WorldTask):
    name = "dinoworld"
    config_cls = DINOWorldConfig

    def build_trainable(self, rngs: nnx.Rngs) -> DINOWorld:
        return DINOWorld(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_frozen(self):
        return {"vfm": self._build_vfm()}

    def loss(self, trainable: DINOWorld, frozen: Any, batch: dict, rng: Array) -> tuple[Array, dict[str, Array]]:
        vfm = frozen["vfm"]
        grid_hw = check_frames(batch["frames"], vfm)
        feats = jax.lax.stop_gradient(vfm(batch["frames"]))
        return trainable.loss(feats, batch["timestamps"], grid_hw, rng)
