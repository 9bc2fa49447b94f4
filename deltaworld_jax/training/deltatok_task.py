"""DeltaTok training (config.model.kind == "deltatok"): the official `_forward_train` + LogCosh criterion.

Per step: the frozen VFM's features of the last two frames of each clip (x = frame T-2, y = frame T-1),
ONE RoPE table with DINOv3's train-time rescale augmentation (drawn from the step's rng, shared by encoder,
decoder and the whole batch), z = encode(x, y), y_hat = decode(z, x), loss = mean log-cosh(y_hat - y) in
float32. The VFM is the frozen module; only DeltaTok is trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax import objectives
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig, default_intermediate_size
from deltaworld_jax.pretrained import build_vfm
from deltaworld_jax.pretrained.dinov3 import as_dtype
from deltaworld_jax.training import tasks

Array = jax.Array

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(DeltaTokConfig)}
# Fields whose default comes from the VFM (the official code copies the VFM's width and heads).
_FROM_VFM = ("hidden_size", "num_heads")


def _get(config_dict, name: str, default=None):
    value = config_dict.get(name, default) if hasattr(config_dict, "get") else getattr(config_dict, name, default)
    return default if value is None else value


def vfm_dims(vfm_config) -> tuple[int, int]:
    """(hidden_size, num_heads) of the VFM a config describes, from an abstract build (nothing allocated;
    with `weights` set, the checkpoint's own config decides, as it does for the frozen VFM itself)."""
    vfm = nnx.eval_shape(lambda: build_vfm(vfm_config))
    return int(vfm.hidden_size), int(vfm.num_heads)


def deltatok_config_from(model_config, vfm_hidden_heads: tuple[int, int] | None = None) -> DeltaTokConfig:
    """DeltaTokConfig from `config.model` (unknown keys such as `kind`, `dtype`, `loss_fn` are ignored).
    hidden_size / num_heads default to the VFM's; intermediate_size to the official template width."""
    values = {name: _get(model_config, name) for name in _CONFIG_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
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


@tasks.register("deltatok")
class DeltaTokTask:
    name = "deltatok"

    def __init__(self, config):
        self.config = config
        self.loss_fn = _get(config.model, "loss_fn", "log_cosh")
        if self.loss_fn not in objectives.LOSSES:
            raise ValueError(f"Unknown loss_fn {self.loss_fn!r}; known: {sorted(objectives.LOSSES)}")
        self.dtype = as_dtype(_get(config.model, "dtype", "float32"))
        self._vfm_dims: tuple[int, int] | None = None

    def model_config(self) -> DeltaTokConfig:
        """DeltaTok's config; width and heads default to the VFM's (read once, kept as plain ints)."""
        needs_vfm = any(_get(self.config.model, name) is None for name in _FROM_VFM)
        if needs_vfm and self._vfm_dims is None:
            self._vfm_dims = vfm_dims(self.config.vfm)
        return deltatok_config_from(self.config.model, self._vfm_dims if needs_vfm else None)

    def build_trainable(self, rngs: nnx.Rngs) -> DeltaTok:
        return DeltaTok(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_frozen(self):
        return build_vfm(self.config.vfm)

    def loss(self, trainable: DeltaTok, frozen: Any, batch: dict, rng: Array) -> tuple[Array, dict[str, Array]]:
        return reconstruction_loss(trainable, frozen, batch["frames"], rng, loss_fn=self.loss_fn)


# ----------------------------------------------------------------------------------------------------
# Measurements: `python -m deltaworld_jax.training.deltatok_task` prints the ViT-B parameter count (built
# abstractly) and the median step time of a tiny config on this machine. A script, not a timed test.
# ----------------------------------------------------------------------------------------------------


def vitb_param_count() -> int:
    """Parameters of the released DeltaTok (two 12-block stacks, hidden 768, 12 heads, SwiGLU 2048)."""
    from deltaworld_jax.models.layers import count_params

    return count_params(nnx.eval_shape(lambda: DeltaTok(DeltaTokConfig(), rngs=nnx.Rngs(0))))


def median_step_seconds(*, hidden: int = 64, heads: int = 4, depth: int = 2, batch: int = 4,
                        frame_hw: tuple[int, int] = (32, 32), patch: int = 8, steps: int = 20) -> float:
    """Median wall time of one jitted train step (VFM forward + DeltaTok forward/backward + AdamW with the
    official clip 0.01) on a tiny config, after one warm-up step."""
    import statistics
    import time

    import optax

    from deltaworld_jax.models.dinov3 import DINOv3, DINOv3Config

    vfm = DINOv3(DINOv3Config(patch_size=patch, hidden_size=hidden, num_layers=depth, num_heads=heads,
                              intermediate_size=4 * hidden), rngs=nnx.Rngs(1))
    model = DeltaTok(DeltaTokConfig(hidden_size=hidden, num_heads=heads, num_layers=depth,
                                    intermediate_size=default_intermediate_size(True, 4 * hidden)),
                     rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(0.01), optax.adamw(1e-3, weight_decay=0.01))
    opt_state = tx.init(params)
    frames = jax.random.randint(jax.random.key(0), (batch, 2, *frame_hw, 3), 0, 256).astype(jnp.uint8)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            return reconstruction_loss(nnx.merge(graphdef, p), vfm, frames, rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, loss = step(params, opt_state, jax.random.key(0))
    jax.block_until_ready(loss)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, jax.random.key(i + 1))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"DeltaTok ViT-B parameters: {vitb_param_count():,}")
    print(f"tiny step (hidden 64, 2+2 blocks, batch 4, 32x32 frames, patch 8) on {jax.devices()[0].platform}: "
          f"median {1e3 * median_step_seconds():.2f} ms over 20 steps")
