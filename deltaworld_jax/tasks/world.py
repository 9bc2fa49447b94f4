"""What the two world-model tasks share ("deltaworld" and "dinoworld", tasks/deltaworld.py and
tasks/dinoworld.py): the official `World._forward_train` + smooth-L1 (beta 0.1) on a predictor whose config
comes from `config.model`.

config.model: kind plus the WorldConfig fields (models/world.py), `dtype` (compute). The predictor reads
tokens/features of the VFM's width: `backbone_hidden_size` defaults to the VFM's hidden size.
config.vfm: the frozen VFM (pretrained.build_vfm).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deltaworld_jax.pretrained import build_vfm
from deltaworld_jax.pretrained.dinov3 import as_dtype
from deltaworld_jax.tasks.base import config_value, fields_from, vfm_width_and_heads

Array = jax.Array


def world_config_from(cls, model_config, vfm_hidden: int | None):
    """DeltaWorldConfig / DINOWorldConfig from `config.model`; backbone_hidden_size defaults to the VFM's."""
    values = fields_from(cls, model_config)
    if "bom_chunk" in values and not values["bom_chunk"]:
        values["bom_chunk"] = None  # 0 in a config: all K candidates in one pass
    if "backbone_hidden_size" not in values:
        if vfm_hidden is None:
            raise ValueError("config.model lacks backbone_hidden_size and no VFM was given to take it from")
        values["backbone_hidden_size"] = vfm_hidden
    return cls(**values)


def check_frames(frames: Array, vfm: Any) -> tuple[int, int]:
    if frames.ndim != 5 or frames.shape[1] < 2:
        raise ValueError(f"world-model training needs frames [B, T>=2, H, W, 3], got shape {frames.shape}")
    return tuple(vfm.grid_hw(frames.shape))


def black_features(vfm: Any, frames: Array) -> Array:
    """VFM features [1, N, D] of an all-black frame of the clip's size (DeltaTok's first 'previous' frame)."""
    return vfm(jnp.zeros((1,) + frames.shape[2:], frames.dtype))


class WorldTask:
    config_cls: type
    name: str

    batch_fields = ("frames", "timestamps")
    trains_from_tokens = False

    @staticmethod
    def validate(config, mode: str) -> None:
        del config, mode

    def __init__(self, config):
        self.config = config
        self.dtype = as_dtype(config_value(config.model, "dtype", "float32"))
        self._vfm_dims: tuple[int, int] | None = None

    def _dims(self) -> tuple[int, int]:
        if self._vfm_dims is None:
            self._vfm_dims = vfm_width_and_heads(self.config.vfm)
        return self._vfm_dims

    def model_config(self):
        needs_vfm = config_value(self.config.model, "backbone_hidden_size") is None
        return world_config_from(self.config_cls, self.config.model, self._dims()[0] if needs_vfm else None)

    def _build_vfm(self):
        vfm = build_vfm(self.config.vfm)
        width = self.model_config().backbone_hidden_size
        if int(vfm.hidden_size) != width:
            raise ValueError(f"the VFM makes {vfm.hidden_size}-wide features but the world model reads "
                             f"{width} (config.model.backbone_hidden_size)")
        return vfm
