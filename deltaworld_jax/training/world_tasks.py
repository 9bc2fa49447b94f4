"""World-model training tasks: "deltaworld" (generative, best-of-K over delta tokens) and "dinoworld" (the
discriminative feature-space baseline), the official `World._forward_train` + smooth-L1 (beta 0.1).

config.model: kind plus the WorldConfig fields (models/predictor.py), `dtype` (compute). The predictor reads
tokens/features of the VFM's width: `backbone_hidden_size` defaults to the VFM's hidden size.
config.vfm: the frozen VFM (pretrained.build_vfm). config.tokenizer (DeltaWorld): the frozen DeltaTok, from
`checkpoint` (load_deltatok), or randomly initialised from its DeltaTokConfig fields when `checkpoint` is
empty AND `allow_random` is set (tests, demos).

DeltaWorld batches with `tokens` [B, T, D] (precomputed delta tokens) train from those without running the
VFM or the tokenizer. `benchmark_best_of_k` (run this module) measures the compiled train step's memory
and time for several K.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.deltatok import DeltaTok
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
from deltaworld_jax.pretrained import build_vfm
from deltaworld_jax.pretrained.dinov3 import as_dtype
from deltaworld_jax.training import checkpointing, tasks
from deltaworld_jax.training.deltatok_task import _get, deltatok_config_from, vfm_dims

Array = jax.Array


def world_config_from(cls, model_config, vfm_hidden: int | None):
    """DeltaWorldConfig / DINOWorldConfig from `config.model`; backbone_hidden_size defaults to the VFM's."""
    values = {f.name: _get(model_config, f.name) for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}
    if "bom_chunk" in values and not values["bom_chunk"]:
        values["bom_chunk"] = None  # 0 in a config: all K candidates in one pass
    if "backbone_hidden_size" not in values:
        if vfm_hidden is None:
            raise ValueError("config.model lacks backbone_hidden_size and no VFM was given to take it from")
        values["backbone_hidden_size"] = vfm_hidden
    return cls(**values)


def _check_frames(frames: Array, vfm: Any) -> tuple[int, int]:
    if frames.ndim != 5 or frames.shape[1] < 2:
        raise ValueError(f"world-model training needs frames [B, T>=2, H, W, 3], got shape {frames.shape}")
    return tuple(vfm.grid_hw(frames.shape))


def black_features(vfm: Any, frames: Array) -> Array:
    """VFM features [1, N, D] of an all-black frame of the clip's size (DeltaTok's first 'previous' frame)."""
    return vfm(jnp.zeros((1,) + frames.shape[2:], frames.dtype))


def clip_tokens(vfm: Any, tokenizer: DeltaTok, frames: Array) -> Array:
    """Delta tokens [B, T, D] of clips of frames (frozen VFM + frozen DeltaTok, inference mode, no grad)."""
    grid_hw = _check_frames(frames, vfm)
    feats = vfm(frames)
    tokens = tokenizer.tokenize_clip(feats, black_features(vfm, frames), tokenizer.rope(grid_hw, rng=None))
    return jax.lax.stop_gradient(tokens.astype(jnp.float32))


class _WorldTask:
    config_cls: type
    name: str

    def __init__(self, config):
        self.config = config
        self.dtype = as_dtype(_get(config.model, "dtype", "float32"))
        self._vfm_dims: tuple[int, int] | None = None

    def _dims(self) -> tuple[int, int]:
        if self._vfm_dims is None:
            self._vfm_dims = vfm_dims(self.config.vfm)
        return self._vfm_dims

    def model_config(self):
        needs_vfm = _get(self.config.model, "backbone_hidden_size") is None
        return world_config_from(self.config_cls, self.config.model, self._dims()[0] if needs_vfm else None)

    def _build_vfm(self):
        vfm = build_vfm(self.config.vfm)
        width = self.model_config().backbone_hidden_size
        if int(vfm.hidden_size) != width:
            raise ValueError(f"the VFM makes {vfm.hidden_size}-wide features but the world model reads "
                             f"{width} (config.model.backbone_hidden_size)")
        return vfm


@tasks.register("deltaworld")
class DeltaWorldTask(_WorldTask):
    name = "deltaworld"
    config_cls = DeltaWorldConfig

    def build_trainable(self, rngs: nnx.Rngs) -> DeltaWorld:
        return DeltaWorld(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_tokenizer(self, vfm: Any) -> DeltaTok:
        tok_config = self.config.get("tokenizer") if hasattr(self.config, "get") else None
        if tok_config is None:
            raise ValueError("DeltaWorld needs config.tokenizer (a DeltaTok checkpoint)")
        checkpoint = _get(tok_config, "checkpoint", "")
        dtype = as_dtype(_get(tok_config, "dtype", "float32"))
        if checkpoint and os.path.isdir(checkpoint) and checkpointing.checkpoint_steps(checkpoint):
            # Our own DeltaTok run's checkpoints (e.g. a recipe's "@deltatok" stage): its sizes are the
            # DeltaTokConfig fields of config.tokenizer, its weights the run's latest checkpoint.
            cfg = deltatok_config_from(tok_config, (int(vfm.hidden_size), int(vfm.num_heads)))
            try:
                tokenizer = checkpointing.restore_module_params(
                    checkpoint, DeltaTok(cfg, dtype=dtype, rngs=nnx.Rngs(int(_get(tok_config, "seed", 0)))))
            except ValueError as error:  # Orbax: a tree / shape mismatch, many lines long
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(
                    f"config.tokenizer.checkpoint={checkpoint!r} (our DeltaTok run) does not match the tokenizer "
                    f"config.tokenizer describes (num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
                    f"num_heads={cfg.num_heads}, intermediate_size={cfg.intermediate_size}): set "
                    f"config.tokenizer.<field> to that run's config.model values. Orbax: {first}") from None
        elif checkpoint:
            from deltaworld_jax.pretrained.deltatok import load_deltatok

            tokenizer = load_deltatok(checkpoint, vfm=vfm, dtype=dtype)
        elif _get(tok_config, "allow_random", False):
            cfg = deltatok_config_from(tok_config, (int(vfm.hidden_size), int(vfm.num_heads)))
            tokenizer = DeltaTok(cfg, dtype=dtype, rngs=nnx.Rngs(int(_get(tok_config, "seed", 0))))
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


@tasks.register("dinoworld")
class DINOWorldTask(_WorldTask):
    name = "dinoworld"
    config_cls = DINOWorldConfig

    def build_trainable(self, rngs: nnx.Rngs) -> DINOWorld:
        return DINOWorld(self.model_config(), dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)

    def build_frozen(self):
        return {"vfm": self._build_vfm()}

    def loss(self, trainable: DINOWorld, frozen: Any, batch: dict, rng: Array) -> tuple[Array, dict[str, Array]]:
        vfm = frozen["vfm"]
        grid_hw = _check_frames(batch["frames"], vfm)
        feats = jax.lax.stop_gradient(vfm(batch["frames"]))
        return trainable.loss(feats, batch["timestamps"], grid_hw, rng)


# ----------------------------------------------------------------------------------------------------
# Measurement: memory and time of the best-of-K train step
# ----------------------------------------------------------------------------------------------------


def benchmark_best_of_k(
    ks: tuple[int, ...] = (1, 256),
    *,
    batch_size: int = 2,
    num_frames: int = 8,
    bom_chunk: int | None = 64,
    steps: int = 2,
    model_overrides: dict | None = None,
) -> dict[int, dict[str, float]]:
    """Compile and time the DeltaWorld train step (tokens -> best-of-K -> loss -> grads -> AdamW update) for
    each K on the default device. Returns {K: {param_count, argument_bytes, temp_bytes, output_bytes, peak_bytes
    (temp + argument), compile_s, step_s}}; step_s is the mean of `steps` timed steps after a warm-up."""
    import optax

    from deltaworld_jax.models.layers import count_params

    results = {}
    for k in ks:
        chunk = None if not bom_chunk else min(bom_chunk, k)
        cfg = DeltaWorldConfig(**{**(model_overrides or {}), "num_samples_train": k, "bom_chunk": chunk})
        model = nnx.jit(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(0)))()
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.4), wrt=nnx.Param)
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.normal(size=(batch_size, num_frames, cfg.backbone_hidden_size)), jnp.float32)
        times = jnp.asarray(np.tile(np.arange(num_frames, dtype=np.float32) * 0.1, (batch_size, 1)))
        graphdef, state = nnx.split((model, optimizer))

        def step(state, tokens, times, key):
            model, optimizer = nnx.merge(graphdef, state)
            (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(tokens, times, key), has_aux=True)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        jitted = jax.jit(step, donate_argnums=0)
        start = time.perf_counter()
        compiled = jitted.lower(state, tokens, times, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        state, loss = compiled(state, tokens, times, jax.random.key(0))
        jax.block_until_ready(loss)
        start = time.perf_counter()
        for i in range(steps):
            state, loss = compiled(state, tokens, times, jax.random.key(i + 1))
        jax.block_until_ready(loss)
        step_s = (time.perf_counter() - start) / steps
        results[k] = {
            "param_count": float(count_params(model)),
            "argument_bytes": float(memory.argument_size_in_bytes),
            "temp_bytes": float(memory.temp_size_in_bytes),
            "output_bytes": float(memory.output_size_in_bytes),
            "peak_bytes": float(memory.temp_size_in_bytes + memory.argument_size_in_bytes),
            "compile_s": compile_s,
            "step_s": step_s,
        }
    return results


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=benchmark_best_of_k.__doc__)
    parser.add_argument("--ks", default="1,256")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--bom_chunk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="width 64, 2 layers instead of the recipe size")
    args = parser.parse_args(argv)
    overrides = dict(hidden_size=64, num_layers=2, num_heads=2, backbone_hidden_size=64,
                     rope_axis_sizes=(28,)) if args.tiny else {}
    ks = tuple(int(k) for k in args.ks.split(","))
    results = benchmark_best_of_k(ks, batch_size=args.batch_size, num_frames=args.num_frames,
                                  bom_chunk=args.bom_chunk, steps=args.steps, model_overrides=overrides)
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch_size} x {args.num_frames} frames; "
          f"bom_chunk {args.bom_chunk}; predictor params {int(results[ks[0]]['param_count']):,}")
    base = results[ks[0]]["peak_bytes"]
    for k, r in results.items():
        print(f"K={k:4d}: peak (temp + arguments) {r['peak_bytes'] / 2**20:8.1f} MiB "
              f"(temp {r['temp_bytes'] / 2**20:.1f}, arguments {r['argument_bytes'] / 2**20:.1f}) "
              f"= {r['peak_bytes'] / base:.2f}x K={ks[0]}; step {r['step_s'] * 1e3:.0f} ms; "
              f"compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
