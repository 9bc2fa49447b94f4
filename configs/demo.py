"""The embedded demo: DeltaTok, then DeltaWorld, on the synthetic stochastic world, in minutes on a laptop CPU.

    python -m deltaworld_jax.main --config=configs/demo.py --workdir=/tmp/demo

Nothing is downloaded: the frames come from the synthetic world (deltaworld_jax/data/synthetic.py: shapes
that move, bounce, and at random moments turn, change speed or appear) and the frozen "VFM" is the
parameter-free pixel-patch one, so features are pixels and predicted features are pictures.

A recipe of two stages, each training in <workdir>/<stage>/ (rerunning resumes / skips finished ones):
  deltatok    DeltaTok learns to encode the change between two frames into ONE token;
  deltaworld  DeltaWorld (best-of-K) learns to predict the next delta token, reading the frozen DeltaTok
              of the first stage. At its last step the demo evaluation (deltaworld_jax/demo.py) scores
              best-of-N, mean-of-N and copy-last on held-out clips and writes to <workdir>/:
              demo_results.json / demo_results.md (the metrics table) and demo_futures.png (sampled
              futures next to the truth).

Config argument (configs/demo.py:<arg>): "" (the full demo, budget 10 minutes on 2 CPU cores) or "quick"
(the same pipeline with a few steps and a small evaluation: seconds, for tests).
"""

from __future__ import annotations

import ml_collections

from deltaworld_jax.data import default_data_config
from configs import common

# 32x32 frames in 4x4 patches: 64 tokens of 3*4*4 = 48 pixel values plus 16 fixed position channels each
# (the VFM width 64, so DeltaTok's width too; 4 heads of 16). The position channels are what lets DeltaTok
# learn to use its token at all in minutes (benchmarks/demo.md: without them its decoder ignored the token).
# 64x64 frames in 8x8 patches (64 tokens of width 192) cost ~16x the FLOPs per step and do not train far
# enough in the 10-minute budget on 2 cores.
FRAME_SIZE = 32
PATCH_SIZE = 4
POSITION_CHANNELS = 16
VFM_WIDTH = 3 * PATCH_SIZE * PATCH_SIZE + POSITION_CHANNELS
VFM_HEADS = VFM_WIDTH // 16

# Per setting: steps and batch sizes of both stages, and the size of the evaluation. DeltaTok: 2000 steps of 16
# pairs reconstruct better than 1000 of 32 at the same cost (its token switches on after some hundred steps;
# benchmarks/demo.md).
SETTINGS = {
    "": dict(frame_size=FRAME_SIZE, deltatok_steps=2000, deltatok_batch=16, world_steps=2000, world_batch=16,
             world_clips=500, eval_clips=64, eval_batch=16, log_every=50, num_pictures=4, samples_shown=4,
             token_check_every=1000),  # ~15 s a check; benchmarks/demo_seeds.py checks every 100
    # Same pipeline and models, 2 steps per stage, 8 eval clips: the test's setting.
    "quick": dict(frame_size=FRAME_SIZE, deltatok_steps=2, deltatok_batch=4, world_steps=2, world_batch=4, world_clips=4,
                  eval_clips=8, eval_batch=8, log_every=1, num_pictures=2, samples_shown=2,
                  token_check_every=2),
}


def _data(num_frames: int, settings: dict) -> ml_collections.ConfigDict:
    data = default_data_config()
    data.source = "synthetic"
    data.num_frames = num_frames
    data.frame_size = settings["frame_size"]
    # The world's time step is fixed at the evaluation stride, so the model learns one dynamics (the paper
    # samples strides from Kinetics' frame rates; the synthetic world gains nothing from it).
    data.time_stride_range = (0.2, 0.2)
    data.crop_scale = (1.0, 1.0)
    data.ratio_jitter = 1.0
    data.horizontal_flip = True
    data.num_workers = 0
    data.read_threads = 1
    data.read_buffer_size = 2
    data.synthetic.height = settings["frame_size"]
    data.synthetic.width = settings["frame_size"]
    data.synthetic.duration = 4.0  # seconds per world clip: training clips span 1.4 s, eval clips 1.2 s
    data.synthetic.fps = 5.0  # one frame per time step: nothing rendered or cached that no clip uses
    data.synthetic.radius_range = (0.12, 0.22)  # 4-7 pixels at 32x32
    # Two shapes at first (appearances add more) moving 2.5-4.5 pixels a frame: motion a tokenizer of this
    # size learns to put in its token within the budget (three slower shapes took far longer).
    data.synthetic.initial_shapes = 2
    data.synthetic.speed_range = (0.4, 0.7)
    data.synthetic.event_rate = 1.5  # events per second: about one in every 3 predicted frames (0.2 s)
    data.eval.num_synthetic_clips = settings["eval_clips"]
    data.eval.batch_size = settings["eval_batch"]
    data.eval.synthetic_stride_seconds = 0.2
    return data


def _vfm() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind="pixel", patch_size=PATCH_SIZE, position_channels=POSITION_CHANNELS,
                                          num_heads=VFM_HEADS, dtype="float32"))


def _deltatok_fields() -> dict:
    """DeltaTok sizes (width and heads are the VFM's: 64 wide, 4 heads of 16); two blocks per stack."""
    return dict(num_layers=2, intermediate_size=128, layer_scale_init=0.1, use_delta=True, use_qk_norm=True, use_gated_attn=True,
                use_swiglu=True, use_rope_aug=True)


def _stage_base(settings: dict, steps: int, batch: int, lr: float, warmup: int) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.dtype = "float32"  # CPU: bfloat16 is emulated and slower
    c.vfm = _vfm()
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    c.train.batch_size = batch
    c.train.num_steps = steps
    c.train.log_every_steps = settings["log_every"]
    # The final checkpoint only (each save costs seconds on a laptop); a reference, so a command-line
    # override of train.num_steps (--config.stage_configs.<stage>.train.num_steps=N) moves it too.
    c.checkpoint.every_steps = c.train.get_ref("num_steps")
    c.checkpoint.keep_last = 1
    c.checkpoint.async_save = False
    c.mesh.shape = dict(data=-1, fsdp=1, tensor=1)
    return c


def deltatok_stage(settings: dict) -> ml_collections.ConfigDict:
    c = _stage_base(settings, settings["deltatok_steps"], settings["deltatok_batch"], lr=2e-3, warmup=50)
    c.model.kind = "deltatok"
    c.model.update(_deltatok_fields())
    # Squared error (objectives.LOSSES), not the official log-cosh: on pixel features the changes are large
    # and sparse, so log-cosh and smooth-L1 act like L1, whose optimum without an informative token is
    # copying, and the tokenizer stayed at copy-last (benchmarks/demo.md).
    c.model.loss_fn = "mse"
    c.data = _data(num_frames=2, settings=settings)
    # A quarter of the training pairs open with a cut from black (black, frame), the pair every clip's token
    # sequence starts with, and half with a scene cut (another clip's frame, frame). Their change is the
    # whole frame, so the token gets a strong pair-specific learning signal from the first steps and the
    # decoder learns to read it; with ordinary pairs alone the encoder cannot at first tell its two frames
    # apart, nothing of a pair's change can be read from its initial token, and whether and when the token
    # switched on depended on the seed and the machine (benchmarks/demo.md, benchmarks/demo_token_signal.py).
    # The scene cuts are what teaches the encoder which frame comes second; with a quarter of them, seed 4's
    # token was still at 10% own-vs-other at step 1500, with half at 56%.
    c.data.synthetic.from_black_probability = 0.25
    c.data.synthetic.cut_probability = 0.5
    # The token check (deltaworld_jax/demo.py:evaluate_tokenizer) every `token_check_every` steps: the log and
    # <workdir>/token_check.jsonl show when the decoder starts to read its token.
    c.data.eval.num_synthetic_clips = settings["eval_batch"]
    c.eval = ml_collections.ConfigDict(dict(every_steps=settings["token_check_every"],
                                            fn="deltaworld_jax.evaluation.demo:evaluate_tokenizer", results_dir="@",
                                            criterion="mse"))
    return c


def deltaworld_stage(settings: dict) -> ml_collections.ConfigDict:
    c = _stage_base(settings, settings["world_steps"], settings["world_batch"], lr=2e-3, warmup=50)
    c.model.kind = "deltaworld"
    c.model.update(dict(hidden_size=64, num_layers=2, num_heads=2, backbone_hidden_size=VFM_WIDTH, mlp_ratio=4,
                        rope_axis_sizes=(28,), rope_unrotated_size=4, use_bom=True, num_samples_train=16,
                        num_samples_eval=16, bom_chunk=0, layer_scale_init=0.1))
    c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="@deltatok", dtype="float32", **_deltatok_fields()))
    c.data = _data(num_frames=8, settings=settings)
    # DeltaWorld trains from precomputed delta tokens (data/token_cache.py): the recipe tokenises the world
    # clips with the frozen DeltaTok of the first stage into <workdir>/world_tokens before this stage
    # trains, and the step runs the predictor alone (~15x cheaper than VFM + tokenizer in every step).
    # The evaluation still runs on frames (held-out world clips num_clips.., through VFM and tokenizer).
    c.data.synthetic.num_clips = settings["world_clips"]
    c.data.token_cache = "@world_tokens"
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=c.train.get_ref("num_steps"),  # once, at the end
        fn="deltaworld_jax.evaluation.demo:evaluate_demo",
        results_dir="@",  # the recipe's workdir
        ctx_lens=(4,), horizons=(1, 3), num_samples=16, seed=0, max_batches=0,
        criterion="mse",  # scored (and 'best' picked) by squared error on the pixel features
        num_pictures=settings["num_pictures"],  # clips shown in demo_futures.png
        samples_shown=settings["samples_shown"],  # sampled futures per clip in the picture
    ))
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in SETTINGS:
        raise ValueError(f"unknown demo setting {arg!r}; expected one of {sorted(SETTINGS)}")
    settings = SETTINGS[arg]
    config = ml_collections.ConfigDict()
    # --config.seed=S seeds both stages (initialisation, batch order, training noise); the world and its
    # held-out evaluation clips stay the same, so runs with different seeds are compared on the same clips.
    # A stage's own --config.stage_configs.<stage>.seed=S still overrides it for that stage alone.
    config.seed = 0
    config.stages = ["deltatok", "deltaworld"]
    config.stage_configs = ml_collections.ConfigDict({"deltatok": deltatok_stage(settings),
                                                      "deltaworld": deltaworld_stage(settings)})
    for stage in config.stages:
        config.stage_configs[stage].seed = config.get_ref("seed") + 0  # a derived reference: see above
    return config
