"""The paper's Kinetics-700 recipe (official README "Training & Evaluation"), stage by stage.

Arguments (`--config=configs/kinetics.py:<arg>`):
  stage=<name>        one stage (below); stages that start from another run need its path as an override
  recipe=deltatok     the four DeltaTok stages in order (--mode=recipe, or plain train: a config of stages)
  recipe=deltaworld   the two DeltaWorld stages (the tokenizer from --config.stage_configs.deltaworld_512.
                      tokenizer.checkpoint=..., ours or the official pytorch_model.bin)
  recipe=all          DeltaTok's four stages, then DeltaWorld's two on the tokenizer just trained

Stages (effective batch 1024 = train.batch_size; per-device batch = 1024 / (data x fsdp devices) /
optim.accumulation_steps; AdamW .9/.999 eps 1e-8, decay only on Linear/Conv weights, 5k warm-up, bf16):
  deltatok_256        lr 1e-3, 256px, 2 frames, 1M steps, wd 0.01, clip 0.01, from scratch
                      (official: 82 h on 8 H200, 65 GB each at 128 per GPU)
  deltatok_512        lr 1e-4, 512px, 500k steps: WEIGHTS-ONLY init from deltatok_256 (fresh optimiser,
                      step 0): --config.train.init_from=<deltatok_256 workdir>/checkpoints
  deltatok_cooldown1  lr 1e-5, to step 550k: FULL resume of deltatok_512 (optimiser, step counter, data
                      position): --config.train.resume_from=<deltatok_512 workdir>/checkpoints
  deltatok_cooldown2  lr 1e-6, to step 600k: full resume of deltatok_cooldown1. The result should reach the
                      released DeltaTok's reconstruction quality: VSPW 58.6 mIoU, Cityscapes 69.6,
                      KITTI RMSE 2.78 (1 frame; official heads)
  deltaworld_512      lr 1e-4, 512px, 8 frames, 300k steps, wd 0.4, no clipping, best-of-256 queries;
                      frozen tokenizer: --config.tokenizer.checkpoint=<deltatok run>/checkpoints or
                      path/to/deltatok-kinetics/pytorch_model.bin
  deltaworld_cooldown lr 1e-5, to step 305k: full resume of deltaworld_512. Should reach the released
                      DeltaWorld: best-of-20 (mean) VSPW 56.3 (54.2), Cityscapes 66.2 (64.2), KITTI 2.95 (3.32)
                      at 1 frame; 51.5 (46.6), 55.3 (49.5), 3.71 (4.74) at 3 frames

Commands (data: `python -m deltaworld_jax.data.prepare` writes Kinetics-700 train as ArrayRecord shards;
the DINOv3 ViT-B/16 weights must be available locally, e.g. a HF folder via --config.vfm.weights=...):
  python -m deltaworld_jax.main --config=configs/kinetics.py:recipe=all --workdir=gs://bucket/kinetics \\
      --config.stage_configs.deltatok_256.data.root=/data/k700_arrayrecord  (one per stage, or edit DATA_ROOT)
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltatok_256 --workdir=/runs/tok256 \\
      --config.data.root=/data/k700_arrayrecord
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltatok_512 --workdir=/runs/tok512 \\
      --config.data.root=... --config.train.init_from=/runs/tok256/checkpoints
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltaworld_512 --workdir=/runs/world \\
      --config.data.root=... --config.tokenizer.checkpoint=/weights/deltatok-kinetics/pytorch_model.bin
Layouts: FSDP is `--config.mesh.shape="{'data': 1, 'fsdp': -1, 'tensor': 1}"` (the default is data
parallel); fewer devices: --config.optim.accumulation_steps=N keeps the effective batch at 1024.
Evaluation during training: --config.eval.every_steps=5000 --config.eval.datasets=vspw,cityscapes,kitti with
--config.data.eval.<set>.root=... and --config.eval.heads (see training/evaluation.py).
"""

from __future__ import annotations

import ml_collections

from deltaworld_jax.data import default_data_config
from deltaworld_jax.training import recipe

DATA_ROOT = ""  # the prepared Kinetics-700 train split (or override data.root per stage)
VFM_WEIGHTS = "facebook/dinov3-vitb16-pretrain-lvd1689m"

STAGES = ("deltatok_256", "deltatok_512", "deltatok_cooldown1", "deltatok_cooldown2", "deltaworld_512",
          "deltaworld_cooldown")
RECIPES = {
    "deltatok": STAGES[:4],
    "deltaworld": STAGES[4:],
    "all": STAGES,
}


def _base(frame_size: int, num_frames: int) -> ml_collections.ConfigDict:
    c = recipe.base_config()
    c.model.dtype = "bfloat16"
    c.vfm = ml_collections.ConfigDict(dict(kind="dinov3", preset="vitb16", weights=VFM_WEIGHTS, dtype="bfloat16"))
    c.data = default_data_config()
    c.data.source = "arrayrecord"
    c.data.root = DATA_ROOT
    c.data.frame_size = frame_size
    c.data.num_frames = num_frames
    c.data.num_workers = 16
    c.train.batch_size = 1024
    c.train.log_every_steps = 50
    c.optim.warmup_steps = 5000
    return c


def _deltatok(frame_size: int, lr: float, num_steps: int) -> ml_collections.ConfigDict:
    c = _base(frame_size, num_frames=2)
    c.model.kind = "deltatok"  # sizes: DeltaTokConfig defaults (the release: 12+12 blocks, VFM width/heads)
    c.optim.lr = lr
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 0.01
    c.train.num_steps = num_steps
    return c


def _deltaworld(lr: float, num_steps: int) -> ml_collections.ConfigDict:
    c = _base(512, num_frames=8)
    c.model.kind = "deltaworld"  # sizes: DeltaWorldConfig defaults (the release: 12 blocks, K=256)
    c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", dtype="bfloat16"))
    c.optim.lr = lr
    c.optim.weight_decay = 0.4
    c.optim.grad_clip_norm = 0.0
    c.train.num_steps = num_steps
    return c


def stage_config(name: str, in_recipe: bool = False) -> ml_collections.ConfigDict:
    """One stage. In a recipe, the link to the previous stage is an '@stage' reference; alone, it is a path
    the command line must give (train.required_source names which one)."""
    if name == "deltatok_256":
        c = _deltatok(256, 1e-3, 1_000_000)
    elif name == "deltatok_512":
        c = _deltatok(512, 1e-4, 500_000)
        c.train.init_from = "@deltatok_256" if in_recipe else ""
        c.train.required_source = "init_from"
    elif name == "deltatok_cooldown1":
        c = _deltatok(512, 1e-5, 550_000)
        c.train.resume_from = "@deltatok_512" if in_recipe else ""
        c.train.required_source = "resume_from"
    elif name == "deltatok_cooldown2":
        c = _deltatok(512, 1e-6, 600_000)
        c.train.resume_from = "@deltatok_cooldown1" if in_recipe else ""
        c.train.required_source = "resume_from"
    elif name == "deltaworld_512":
        c = _deltaworld(1e-4, 300_000)
    elif name == "deltaworld_cooldown":
        c = _deltaworld(1e-5, 305_000)
        c.train.resume_from = "@deltaworld_512" if in_recipe else ""
        c.train.required_source = "resume_from"
    else:
        raise ValueError(f"Unknown stage {name!r}; known: {STAGES}")
    return c


def get_config(arg: str = "stage=deltatok_256") -> ml_collections.ConfigDict:
    key, _, value = (arg or "").partition("=")
    if key == "stage":
        return stage_config(value)
    if key == "recipe":
        if value not in RECIPES:
            raise ValueError(f"Unknown recipe {value!r}; known: {sorted(RECIPES)}")
        config = ml_collections.ConfigDict()
        config.stages = list(RECIPES[value])
        config.stage_configs = ml_collections.ConfigDict(
            {name: stage_config(name, in_recipe=True) for name in RECIPES[value]})
        if "deltaworld_512" in config.stage_configs:
            world = config.stage_configs.deltaworld_512
            if value == "all":
                world.tokenizer.checkpoint = "@deltatok_cooldown2"
            # The cool-down reads the same frozen tokenizer: one value, overridable once.
            config.stage_configs.deltaworld_cooldown.tokenizer.checkpoint = world.tokenizer.get_ref("checkpoint")
        return config
    raise ValueError(f"Unknown config argument {arg!r}: use stage=<{'|'.join(STAGES)}> or "
                     f"recipe=<{'|'.join(RECIPES)}>")
