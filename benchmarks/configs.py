"""Benchmark configs: `--config=benchmarks/configs.py:<name>`.

  tiny_deltatok, tiny_deltaworld, tiny_dinoworld   the test sizes (pixel-patch VFM 8x8 -> width 192,
        32x32 frames, 1-2 blocks): seconds to compile, for FLOPs cross-checks and CPU step timings.
  demo_deltaworld_tokens   the demo DeltaWorld (configs/demo.py sizes) trained from cached tokens.
  recipe_deltatok_256, recipe_deltatok_512, recipe_deltaworld, recipe_dinoworld   the published recipe's
        models (DINOv3 ViT-B/16, DeltaTok ViT-B x 2, ViT-B predictor, bf16, effective batch 1024) with
        randomly initialised frozen modules: what the AOT compiles and FLOP counts need, nothing
        downloaded. Use configs/kinetics.py:stage=... for real runs; these mirror its stages.
"""

import ml_collections

from deltaworld_jax.data import default_data_config
from configs import common


def _tiny(kind: str) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.kind = kind
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.vfm = ml_collections.ConfigDict(dict(kind="pixel", patch_size=8, num_heads=3, weights=""))
    c.data = default_data_config()
    c.data.update(dict(source="synthetic", num_frames=2 if kind == "deltatok" else 4, frame_size=32, num_workers=0))
    c.data.synthetic.update(dict(height=32, width=32, duration=2.0, fps=10.0))
    c.train.batch_size = 8
    if kind == "deltatok":
        c.model.update(dict(num_layers=2, intermediate_size=256))
    else:
        c.model.update(dict(hidden_size=128, num_layers=2, num_heads=4,
                            rope_axis_sizes=(28,) if kind == "deltaworld" else (10, 10, 8)))
    if kind == "deltaworld":
        c.model.update(dict(num_samples_train=16, bom_chunk=0))
        c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", allow_random=True, num_layers=2,
                                                     intermediate_size=256))
    return c


def _recipe(stage: str) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.vfm = ml_collections.ConfigDict(dict(kind="dinov3", preset="vitb16", weights="", dtype="bfloat16"))
    c.model.dtype = "bfloat16"
    c.model.remat = "none"
    c.train.batch_size = 1024
    if stage.startswith("deltatok"):
        c.model.kind = "deltatok"
        c.data = ml_collections.ConfigDict(dict(num_frames=2, frame_size=int(stage.split("_")[1]),
                                                time_stride_range=(1 / 25, 1 / 3)))
        c.optim.grad_clip_norm = 0.01
    else:
        c.model.kind = stage
        # token_cache: a folder (any name: nothing is read) makes DeltaWorld's step read tokens, not frames.
        c.data = ml_collections.ConfigDict(dict(num_frames=8, frame_size=512, time_stride_range=(1 / 25, 1 / 3),
                                                token_cache=""))
        c.optim.lr, c.optim.weight_decay = 1e-4, 0.4
        if stage == "deltaworld":
            c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", allow_random=True, dtype="bfloat16"))
    return c


def get_config(name: str = "tiny_deltatok") -> ml_collections.ConfigDict:
    if name.startswith("tiny_"):
        return _tiny(name[len("tiny_"):])
    if name.startswith("recipe_"):
        return _recipe(name[len("recipe_"):])
    if name == "demo_deltaworld_tokens":
        from configs import demo

        return demo.get_config("").stage_configs.deltaworld  # data.token_cache is set: batches of tokens
    raise ValueError(f"unknown benchmark config {name!r}")
