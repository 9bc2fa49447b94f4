"""The paper's Kinetics-700 recipe (official README "Training & Evaluation"), stage by stage.

Arguments (`--config=configs/kinetics.py:<arg>`):
  stage=<name>        one stage (below); stages that start from another run need its path as an override
  recipe=deltatok     the four DeltaTok stages in order (--mode=recipe, or plain train: a config of stages)
  recipe=deltaworld   the two DeltaWorld stages (the tokenizer from --config.stage_configs.deltaworld_512.
                      tokenizer.checkpoint=..., ours or the official pytorch_model.bin)
  recipe=all          DeltaTok's four stages, then DeltaWorld's two on the tokenizer just trained
  recipe=dinoworld    DINO-World, the discriminative baseline in the same code: its two stages (below)

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
  dinoworld_512       DINO-World, the official `World` recipe: lr 1e-4, 512px, 8 frames, 300k steps, wd 0.4,
                      no clipping. It predicts every patch feature of the next frame from all past frames'
                      features (3-D RoPE, one learned query per patch): no tokenizer, no best-of-many. It
                      should land below DeltaWorld's best-of-20 and near its mean-of-20 at 1 frame (the
                      paper's comparison), at a far higher cost per step (1024 keys/values per past frame)
  dinoworld_cooldown  lr 1e-5, to step 305k: full resume of dinoworld_512

Commands (data: `python -m deltaworld_jax.data.prepare` writes Kinetics-700 train as ArrayRecord shards;
the DINOv3 ViT-B/16 weights must be available locally, e.g. a HF folder via --config.vfm.weights=...):
  python -m deltaworld_jax.main --config=configs/kinetics.py:recipe=all --workdir=gs://bucket/kinetics \\
      --mode=recipe --config.stage_configs.deltatok_256.data.root=/data/k700_arrayrecord  (one per stage, or
      edit DATA_ROOT; every override of a recipe is --config.stage_configs.<stage>.<field>=...)
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltatok_256 --workdir=/runs/tok256 \\
      --config.data.root=/data/k700_arrayrecord
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltatok_512 --workdir=/runs/tok512 \\
      --config.data.root=... --config.train.init_from=/runs/tok256/checkpoints
  python -m deltaworld_jax.main --config=configs/kinetics.py:stage=deltaworld_512 --workdir=/runs/world \\
      --config.data.root=... --config.tokenizer.checkpoint=/weights/deltatok-kinetics/pytorch_model.bin
Layouts: FSDP is `--config.mesh.shape="{'data': 1, 'fsdp': -1, 'tensor': 1}"` (the default is data
parallel); fewer devices: --config.optim.accumulation_steps=N keeps the effective batch at 1024.
Sizes: config.model holds the architecture at the release's sizes (DeltaTok's hidden_size / num_heads: None =
the VFM's). In a recipe, a stage that continues another shares its sizes (one override changes the chain)
and DeltaWorld's tokenizer takes the DeltaTok stages' sizes; a stand-alone DeltaWorld stage on OUR DeltaTok
checkpoints needs --config.tokenizer.<num_layers|intermediate_size|...>=... to match them (an official
pytorch_model.bin carries its own).
Evaluation: every stage declares the official validation (config.eval: eval_hook every EVAL_EVERY_STEPS
steps on datasets "vspw,cityscapes,kitti", the released heads in EVAL_HEADS; evaluation/protocol.py):
  --config.data.eval.vspw.root=/data/VSPW --config.data.eval.cityscapes.root=/data/cityscapes \\
  --config.data.eval.kitti.root=/data/kitti --config.eval.heads.vspw=/weights/seg-head-vspw/pytorch_model.bin \\
  --config.eval.heads.cityscapes=... --config.eval.heads.kitti=/weights/depth-head-kitti/pytorch_model.bin \\
  [--config.eval.every_steps=5000 --config.eval.datasets=vspw,cityscapes,kitti --config.eval.results_dir=...]
(in a recipe each with the stage_configs.<stage>. prefix). A set without a root is left out; with no root at
all the stage trains without evaluation, and says so in its log. A finished run is evaluated by the same
command with --mode=eval (a recipe: each stage's <workdir>/<stage>, or those of --stages=a,b).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from deltaworld_jax.data import default_data_config
from deltaworld_jax.models.deltatok import default_intermediate_size
from configs import common

DATA_ROOT = ""  # the prepared Kinetics-700 train split (or override data.root per stage)
VFM_WEIGHTS = "facebook/dinov3-vitb16-pretrain-lvd1689m"
# The validation sets in their official layouts (deltaworld_jax/data/eval_sources.py) and the released task
# heads (Hugging Face Amazon-FAR/seg-head-vspw, seg-head-cityscapes, depth-head-kitti: the downloaded
# pytorch_model.bin or its folder). A set without a root is not evaluated; with no root at all the stage
# trains without evaluation (logged). A set without a head gets the feature losses only.
EVAL_ROOTS = {"vspw": "", "cityscapes": "", "kitti": ""}
EVAL_HEADS = {"vspw": "", "cityscapes": "", "kitti": ""}
EVAL_EVERY_STEPS = 5000

DELTATOK_STAGES = ("deltatok_256", "deltatok_512", "deltatok_cooldown1", "deltatok_cooldown2")
DELTAWORLD_STAGES = ("deltaworld_512", "deltaworld_cooldown")
DINOWORLD_STAGES = ("dinoworld_512", "dinoworld_cooldown")
# The paper's stages and recipes (each has a row of hardware in launch/topologies.json).
STAGES = DELTATOK_STAGES + DELTAWORLD_STAGES
RECIPES = {
    "deltatok": DELTATOK_STAGES,
    "deltaworld": DELTAWORLD_STAGES,
    "all": STAGES,
}
# The baseline the paper compares with, trained by the same code (no launch/ rows: give the hardware).
BASELINE_STAGES = DINOWORLD_STAGES
BASELINE_RECIPES = {"dinoworld": DINOWORLD_STAGES}


def _base(frame_size: int, num_frames: int) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.dtype = "bfloat16"
    # Blocks stored stacked ([num_layers, ...] parameters, one scan; models/block_stack.BlockStack): the same model
    # and weights as the per-layer layout, a several times shorter compile (benchmarks/RESULTS.md).
    c.model.scan_layers = True
    c.vfm = ml_collections.ConfigDict(dict(kind="dinov3", preset="vitb16", weights=VFM_WEIGHTS, dtype="bfloat16",
                                           attention_impl=common.ATTENTION_IMPL, scan_layers=True))
    c.data = default_data_config()
    c.data.source = "arrayrecord"
    c.data.root = DATA_ROOT
    c.data.frame_size = frame_size
    c.data.num_frames = num_frames
    c.data.num_workers = 16
    c.train.batch_size = 1024
    c.train.log_every_steps = 50
    c.optim.warmup_steps = 5000
    for name, root in EVAL_ROOTS.items():
        c.data.eval[name].root = root
    c.eval = _eval()
    return c


def _eval() -> ml_collections.ConfigDict:
    """The official validation (evaluation/protocol.py eval_hook): VSPW, Cityscapes, KITTI clips of 7 frames,
    context 4, horizons 1 and 3, read by the released heads. Roots: config.data.eval.<set>.root."""
    return ml_collections.ConfigDict(dict(
        fn="deltaworld_jax.evaluation.protocol:eval_hook",
        every_steps=EVAL_EVERY_STEPS,
        datasets="vspw,cityscapes,kitti",  # comma-separated; sets without a root are left out
        heads=ml_collections.ConfigDict(dict(EVAL_HEADS)),
        ctx_lens=(4,), horizons=(1, 3),
        num_samples=0,  # rollouts per clip: 0 = the model's (DeltaWorld: num_samples_eval, 20)
        copy_last=True,  # also score the copy-last lower bound
        max_batches=0,  # per set; 0 = the whole validation set
        num_plots=1,  # clips drawn as pictures
        seed=0,
        results_dir="",  # also write eval_results_<step>.json/.md there ("@<stage>" in a recipe)
    ))


# DeltaTok's size fields (the release: 12 + 12 blocks, the VFM's width and heads, SwiGLU MLP).
DELTATOK_SIZE_FIELDS = ("hidden_size", "num_heads", "num_layers", "intermediate_size")


def deltatok_sizes() -> dict:
    return dict(hidden_size=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),  # None: the VFM's
                num_layers=12, intermediate_size=default_intermediate_size(True))


def _deltatok(frame_size: int, lr: float, num_steps: int) -> ml_collections.ConfigDict:
    c = _base(frame_size, num_frames=2)
    c.model.kind = "deltatok"
    c.model.update(deltatok_sizes())
    return _optimise(c, lr=lr, weight_decay=0.01, grad_clip_norm=0.01, num_steps=num_steps)


def _optimise(c: ml_collections.ConfigDict, *, lr: float, weight_decay: float, grad_clip_norm: float,
              num_steps: int) -> ml_collections.ConfigDict:
    """A stage's optimiser settings and length (grad_clip_norm 0: no clipping)."""
    c.optim.lr = lr
    c.optim.weight_decay = weight_decay
    c.optim.grad_clip_norm = grad_clip_norm
    c.train.num_steps = num_steps
    return c


def _deltaworld(lr: float, num_steps: int) -> ml_collections.ConfigDict:
    c = _base(512, num_frames=8)
    c.model.kind = "deltaworld"
    c.model.update(dict(  # the release: 12 blocks, 768 wide, 12 heads, 1-D RoPE 60 + 4, best-of-256
        hidden_size=768, num_layers=12, num_heads=12, mlp_ratio=4, rope_axis_sizes=(60,), rope_unrotated_size=4,
        backbone_hidden_size=config_dict.placeholder(int),  # None: the VFM's width
        num_samples_train=256, num_samples_eval=20, bom_chunk=64))
    # The frozen tokenizer: an official pytorch_model.bin (sizes read from its tensors) or our DeltaTok run's
    # checkpoints (sizes: the DeltaTok fields below, which must match that run's config.model).
    c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", dtype="bfloat16", scan_layers=True,
                                                 attention_impl=common.ATTENTION_IMPL, **deltatok_sizes()))
    return _optimise(c, lr=lr, weight_decay=0.4, grad_clip_norm=0.0, num_steps=num_steps)


def _dinoworld(lr: float, num_steps: int) -> ml_collections.ConfigDict:
    c = _base(512, num_frames=8)
    c.model.kind = "dinoworld"  # sizes: DINOWorldConfig defaults (12 blocks, 768 wide, 3-D RoPE 20+20+20+4)
    return _optimise(c, lr=lr, weight_decay=0.4, grad_clip_norm=0.0, num_steps=num_steps)


# Each stage: its builder and arguments (lr, steps; DeltaTok: also the frame size), and how it starts from an
# earlier stage: (the config.train field, that stage), or None for a stage that starts fresh.
_STAGE_TABLE = {
    "deltatok_256": (_deltatok, (256, 1e-3, 1_000_000), None),
    "deltatok_512": (_deltatok, (512, 1e-4, 500_000), ("init_from", "deltatok_256")),
    "deltatok_cooldown1": (_deltatok, (512, 1e-5, 550_000), ("resume_from", "deltatok_512")),
    "deltatok_cooldown2": (_deltatok, (512, 1e-6, 600_000), ("resume_from", "deltatok_cooldown1")),
    "deltaworld_512": (_deltaworld, (1e-4, 300_000), None),
    "deltaworld_cooldown": (_deltaworld, (1e-5, 305_000), ("resume_from", "deltaworld_512")),
    "dinoworld_512": (_dinoworld, (1e-4, 300_000), None),
    "dinoworld_cooldown": (_dinoworld, (1e-5, 305_000), ("resume_from", "dinoworld_512")),
}


def stage_config(name: str, in_recipe: bool = False) -> ml_collections.ConfigDict:
    """One stage. In a recipe, the link to the previous stage is an '@stage' reference; alone, it is a path
    the command line must give (train.required_source names which one)."""
    if name not in _STAGE_TABLE:
        raise ValueError(f"Unknown stage {name!r}; known: {STAGES + BASELINE_STAGES}")
    build, args, starts_from = _STAGE_TABLE[name]
    c = build(*args)
    if starts_from is not None:
        field, previous = starts_from
        c.train[field] = f"@{previous}" if in_recipe else ""
        c.train.required_source = field
    return c


def get_config(arg: str = "stage=deltatok_256") -> ml_collections.ConfigDict:
    key, _, value = (arg or "").partition("=")
    if key == "stage":
        return stage_config(value)
    if key == "recipe":
        recipes = {**RECIPES, **BASELINE_RECIPES}
        if value not in recipes:
            raise ValueError(f"Unknown recipe {value!r}; known: {sorted(recipes)}")
        config = ml_collections.ConfigDict()
        config.stages = list(recipes[value])
        config.stage_configs = ml_collections.ConfigDict(
            {name: stage_config(name, in_recipe=True) for name in recipes[value]})
        _link_sizes(config.stage_configs)
        if "deltaworld_512" in config.stage_configs:
            world = config.stage_configs.deltaworld_512
            if value == "all":
                world.tokenizer.checkpoint = "@deltatok_cooldown2"
                # Our run's checkpoints carry no config: the tokenizer's sizes and layout are the DeltaTok
                # stages'.
                for field in DELTATOK_SIZE_FIELDS + ("scan_layers",):
                    world.tokenizer[field] = config.stage_configs.deltatok_256.model.get_ref(field)
            # The cool-down reads the same frozen tokenizer: one value, overridable once.
            for field in ("checkpoint", "scan_layers") + DELTATOK_SIZE_FIELDS:
                config.stage_configs.deltaworld_cooldown.tokenizer[field] = world.tokenizer.get_ref(field)
        return config
    raise ValueError(f"Unknown config argument {arg!r}: use stage=<{'|'.join(STAGES + BASELINE_STAGES)}> or "
                     f"recipe=<{'|'.join({**RECIPES, **BASELINE_RECIPES})}>")


def _link_sizes(stages: ml_collections.ConfigDict) -> None:
    """Stages that continue another one (weights init, full resume) have its model sizes: in a recipe they
    are references to the first stage's, so one override (of any of them) changes the whole chain."""
    for family in (DELTATOK_STAGES, DELTAWORLD_STAGES, DINOWORLD_STAGES):
        present = [name for name in family if name in stages]
        for name in present[1:]:
            first = stages[present[0]].model
            for field, value in first.items():
                if field not in ("kind",) and not isinstance(value, ml_collections.ConfigDict):
                    stages[name].model[field] = first.get_ref(field)
