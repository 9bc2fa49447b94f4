"""DeltaWorld training (config.model.kind == "deltaworld"): the generative world model, best-of-K over
delta tokens (tasks/world.py has what it shares with DINO-World).

config.tokenizer: the frozen DeltaTok, from `checkpoint` (our own DeltaTok run's checkpoints directory, or
the official weights: load_deltatok), or randomly initialised from its DeltaTokConfig fields when
`checkpoint` is empty AND `allow_random` is set (tests, demos). Batches with `tokens` [B, T, D]
(precomputed delta tokens, data/token_cache.py) train from those without running the VFM or the tokenizer.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from deltaworld_jax.models.deltatok import DeltaTok
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.pretrained import runs
from deltaworld_jax.pretrained.dinov3 import as_dtype
from deltaworld_jax.tasks.base import config_value
from deltaworld_jax.tasks.deltatok import deltatok_config_from
from deltaworld_jax.tasks.world import WorldTask, black_features, check_frames

Array = jax.Array


def clip_tokens(vfm: Any, tokenizer: DeltaTok, frames: Array) -> Array:
    """Delta tokens [B, T, D] of clips of frames (frozen VFM + frozen DeltaTok, inference mode, no grad)."""
    grid_hw = check_frames(frames, vfm)
    feats = vfm(frames)
    tokens = tokenizer.tokenize_clip(feats, black_features(vfm, frames), tokenizer.rope(grid_hw, rng=None))
    return jax.lax.stop_gradient(tokens.astype(jnp.float32))


class DeltaWorldTask(WorldTask):
    name = "deltaworld"
    config_cls = DeltaWorldConfig
    batch_fields = ("frames", "timestamps")  # or ("tokens", "timestamps") from the token cache
    trains_from_tokens = True

    @staticmethod
    def validate(config, mode: str) -> None:
        del mode
        tokenizer = config.get("tokenizer", None)
        checkpoint = tokenizer.get("checkpoint", "") if tokenizer else ""
        allow_random = tokenizer.get("allow_random", False) if tokenizer else False
        if not checkpoint and not allow_random:
            raise ValueError("DeltaWorld needs a trained tokenizer: set config.tokenizer.checkpoint to a DeltaTok "
                             "checkpoint (our run's checkpoints dir, or the official pytorch_model.bin)")
        if checkpoint and not epath.Path(checkpoint).exists():
            raise ValueError(f"config.tokenizer.checkpoint={checkpoint!r} does not exist")

    def build_trainable(self, rngs: nnx.Rngs) -> DeltaWorld:
        return DeltaWorld(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_tokenizer(self, vfm: Any) -> DeltaTok:
        tok_config = self.config.get("tokenizer") if hasattr(self.config, "get") else None
        if tok_config is None:
            raise ValueError("DeltaWorld needs config.tokenizer (a DeltaTok checkpoint)")
        checkpoint = config_value(tok_config, "checkpoint", "")
        dtype = as_dtype(config_value(tok_config, "dtype", "float32"))
        if checkpoint and os.path.isdir(checkpoint) and runs.checkpoint_steps(checkpoint):
            # Our own DeltaTok run's checkpoints (e.g. a recipe's "@deltatok" stage): its sizes are the
            # DeltaTokConfig fields of config.tokenizer, its weights the run's latest checkpoint.
            cfg = deltatok_config_from(tok_config, (int(vfm.hidden_size), int(vfm.num_heads)))
            try:
                # Built abstractly: every weight comes from the checkpoint (initialising them first cost
                # ~2.5 s of op-by-op compiles for the demo's tiny tokenizer on a CPU, for nothing).
                tokenizer = runs.restore_module_params(
                    checkpoint, nnx.eval_shape(lambda: DeltaTok(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
            except ValueError as error:  # Orbax: a tree / shape mismatch, many lines long
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(
                    f"config.tokenizer.checkpoint={checkpoint!r} (our DeltaTok run) does not match the tokenizer "
                    f"config.tokenizer describes (num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
                    f"num_heads={cfg.num_heads}, intermediate_size={cfg.intermediate_size}, "
                    f"scan_layers={cfg.scan_layers}): set "
                    f"config.tokenizer.<field> to that run's config.model values. Orbax: {first}") from None
        elif checkpoint:
            from deltaworld_jax.pretrained.deltatok import load_deltatok

            tokenizer = load_deltatok(checkpoint, vfm=vfm, dtype=dtype,
                                      attention_impl=config_value(tok_config, "attention_impl", "xla"),
                                      scan_layers=bool(config_value(tok_config, "scan_layers", False)))
        elif config_value(tok_config, "allow_random", False):
            cfg = deltatok_config_from(tok_config, (int(vfm.hidden_size), int(vfm.num_heads)))
            tokenizer = DeltaTok(cfg, dtype=dtype, rngs=nnx.Rngs(int(config_value(tok_config, "seed", 0))))
        else:
            raise ValueError("config.tokenizer.checkpoint is empty: DeltaWorld trains on the tokens of a trained "
                             "DeltaTok. Give its weights (pytorch_model.bin / .ckpt / .safetensors), or set "
                             "config.tokenizer.allow_random=True for a randomly initialised tokenizer (tests)")
        width = self.model_config().backbone_hidden_size
        if tokenizer.cfg.hidden_size != width:
            raise ValueError(f"the tokenizer makes {tokenizer.cfg.hidden_size}-wide tokens but the world model "
                             f"reads {width}")
        return tokenizer

    def build_frozen(self):
        vfm = self._build_vfm()
        return {"vfm": vfm, "tokenizer": self.build_tokenizer(vfm)}

    def loss(self, trainable: DeltaWorld, frozen: Any, batch: dict, rng: Array) -> tuple[Array, dict[str, Array]]:
        if "tokens" in batch:
            tokens = batch["tokens"]
        else:
            tokens = clip_tokens(frozen["vfm"], frozen["tokenizer"], batch["frames"])
        return trainable.loss(tokens, batch["timestamps"], rng)
