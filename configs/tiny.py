"""Tiny configs of the REAL tasks for tests and smoke runs on a CPU: the synthetic world at 16x16, the
parameter-free pixel-patch VFM (4x4 patches: 16 tokens, 48 wide), one-block DeltaTok / predictors.

Arguments: deltatok | deltaworld | dinoworld (one stage; deltaworld uses a randomly initialised tokenizer)
or recipe (DeltaTok, then DeltaWorld on the DeltaTok just trained, read from its checkpoints).
  python -m deltaworld_jax.main --config=configs/tiny.py:recipe --workdir=/tmp/tiny
Runs in well under a minute; the losses only have to be finite and the stages to chain.
"""

from __future__ import annotations

import ml_collections

from deltaworld_jax.data import default_data_config
from configs import common

FRAME_SIZE = 16
PATCH = 4
WIDTH = 3 * PATCH * PATCH  # the pixel-patch VFM's width


def _deltatok_fields() -> dict:
    return dict(num_layers=1, num_heads=3, intermediate_size=64)


def _base(kind: str, num_frames: int, steps: int = 2) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.kind = kind
    c.model.dtype = "float32"
    c.vfm = ml_collections.ConfigDict(dict(kind="pixel", patch_size=PATCH, num_heads=0, dtype="float32"))
    c.data = default_data_config()
    c.data.num_frames = num_frames
    c.data.frame_size = FRAME_SIZE
    c.data.synthetic.height = c.data.synthetic.width = FRAME_SIZE
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.train.batch_size = 4
    c.train.num_steps = steps
    c.train.log_every_steps = 1
    c.train.write_metrics = False
    c.checkpoint.every_steps = steps
    c.checkpoint.keep_last = 1
    c.checkpoint.async_save = False
    return c


def _world_fields(kind: str) -> dict:
    axes = (12,) if kind == "deltaworld" else (4, 4, 4)  # + 4 unrotated = head_dim 16
    return dict(hidden_size=32, num_layers=1, num_heads=2, backbone_hidden_size=WIDTH, mlp_ratio=2,
                rope_axis_sizes=axes, rope_unrotated_size=4, num_samples_train=4, num_samples_eval=2, bom_chunk=0)


def stage(kind: str) -> ml_collections.ConfigDict:
    if kind == "deltatok":
        c = _base("deltatok", num_frames=2)
        c.model.update(_deltatok_fields())
        c.optim.grad_clip_norm = 0.01
    elif kind in ("deltaworld", "dinoworld"):
        c = _base(kind, num_frames=4)
        c.model.update(_world_fields(kind))
        c.optim.weight_decay = 0.4
        if kind == "deltaworld":
            c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", allow_random=True, dtype="float32",
                                                         **_deltatok_fields()))
    else:
        raise ValueError(f"Unknown tiny config {kind!r}: deltatok | deltaworld | dinoworld | recipe")
    return c


def get_config(arg: str = "deltatok") -> ml_collections.ConfigDict:
    if arg != "recipe":
        return stage(arg)
    config = ml_collections.ConfigDict()
    config.stages = ["deltatok", "deltaworld"]
    world = stage("deltaworld")
    world.tokenizer.checkpoint = "@deltatok"
    world.tokenizer.allow_random = False
    config.stage_configs = ml_collections.ConfigDict({"deltatok": stage("deltatok"), "deltaworld": world})
    return config
