"""DeltaTok training (config.model.kind == "deltatok"): the official `_forward_train` + LogCosh criterion.

Per step: the frozen VFM's features of the last two frames of each clip (x = frame T-2, y = frame T-1),
ONE RoPE table with DINOv3's train-time rescale augmentation (drawn from the step's rng, shared by encoder,
decoder and the whole batch), z = encode(x, y), y_hat = decode(z, x), loss = mean log-cosh(y_hat - y) in
float32. The VFM is the frozen module; only DeltaTok is trained.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax import objectives
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig, default_intermediate_size
from deltaworld_jax.pretrained import build_vfm
from deltaworld_jax.pretrained.dinov3 import as_dtype
from deltaworld_jax.tasks.base import config_value, fields_from, vfm_width_and_heads

Array = jax.Array

# Fields whose default comes from the VFM (the official code copies the VFM's width and heads).
_FROM_VFM = ("hidden_size", "num_heads")


def deltatok_config_from(model_config, vfm_hidden_heads: tuple[int, int] | None = None) -> DeltaTokConfig:
    """DeltaTokConfig from `config.model` (unknown keys such as `kind`, `dtype`, `loss_fn` are ignored).
    hidden_size / num_heads default to the VFM's; intermediate_size to the official template width."""
    values = fields_from(DeltaTokConfig, model_config)
    missing = [name for name in _FROM_VFM if name not in values]
    if missing:
        if vfm_hidden_heads is None:
            raise ValueError(f"config.model lacks {missing} and no VFM was given to take them from")
        values.update({k: v for k, v in zip(_FROM_VFM, vfm_hidden_heads) if k in missing})
    values.setdefault("intermediate_size", default_intermediate_size(values.get("use_swiglu", True)))
    return DeltaTokConfig(**values)


def reconstruction_loss(model: DeltaTok, vfm: Any, frames: Array, rng: Array | None, *,
                        loss_fn: str = "log_cosh") -> tuple[Array, dict[str, Array]]:
    """Loss and metrics of reconstructing the last frame's features from the one before it."""
    if frames.ndim != 5 or frames.shape[1] < 2:
        raise ValueError(f"DeltaTok training needs frames [B, T>=2, H, W, 3], got shape {frames.shape}")
    h, w = frames.shape[2:4]
    p = vfm.patch_size
    if h % p or w % p:
        raise ValueError(f"frame size {h}x{w} is not a multiple of the VFM patch size {p}")
    feats = jax.lax.stop_gradient(vfm(frames[:, -2:]))  # [B, 2, N, D]
    if feats.shape[-1] != model.cfg.hidden_size:
        raise ValueError(f"VFM width {feats.shape[-1]} != DeltaTok hidden_size {model.cfg.hidden_size}")
    x, y = feats[:, 0], feats[:, 1]
    rope = model.rope((h // p, w // p), rng)
    y_hat = model.decode(model.encode(x, y, rope), x, rope)
    criterion = objectives.LOSSES[loss_fn]
    loss = jnp.mean(criterion(y_hat, y))
    y32, err = y.astype(jnp.float32), y_hat.astype(jnp.float32) - y.astype(jnp.float32)
    metrics = {
        "loss": loss,
        # ||y_hat - y|| / ||y||: scale-free reconstruction quality.
        "rel_error": jnp.sqrt(jnp.sum(err * err) / jnp.maximum(jnp.sum(y32 * y32), 1e-12)),
        # The copy-last baseline (y_hat = x) on the same batch: the loss the tokenizer has to beat.
        "copy_last_loss": jax.lax.stop_gradient(jnp.mean(criterion(x, y))),
    }
    return loss, metrics


class DeltaTokTask:
    name = "deltatok"
    batch_fields = ("frames",)  # the last two frames of each clip
    trains_from_tokens = False

    @staticmethod
    def validate(config, mode: str) -> None:
        del mode
        loss_fn = config_value(config.model, "loss_fn", "log_cosh")
        if loss_fn not in objectives.LOSSES:
            raise ValueError(f"Unknown loss_fn {loss_fn!r}; known: {sorted(objectives.LOSSES)}")

    def __init__(self, config):
        self.config = config
        self.validate(config, "train")
        self.loss_fn = config_value(config.model, "loss_fn", "log_cosh")
        self.dtype = as_dtype(config_value(config.model, "dtype", "float32"))
        self._vfm_dims: tuple[int, int] | None = None

    def model_config(self) -> DeltaTokConfig:
        """DeltaTok's config; width and heads default to the VFM's (read once, kept as plain ints)."""
        needs_vfm = any(config_value(self.config.model, name) is None for name in _FROM_VFM)
        if needs_vfm and self._vfm_dims is None:
            self._vfm_dims = vfm_width_and_heads(self.config.vfm)
        return deltatok_config_from(self.config.model, self._vfm_dims if needs_vfm else None)

    def build_trainable(self, rngs: nnx.Rngs) -> DeltaTok:
        return DeltaTok(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_frozen(self):
        return build_vfm(self.config.vfm)

    def loss(self, trainable: DeltaTok, frozen: Any, batch: dict, rng: Array) -> tuple[Array, dict[str, Array]]:
        return reconstruction_loss(trainable, frozen, batch["frames"], rng, loss_fn=self.loss_fn)
