"""Side by side: our train steps and forecast against the official PyTorch code, same configuration.

  python benchmarks/official_side_by_side.py --official_repo=/tmp/deltatok_official [--rounds=3 --steps=5]
  python benchmarks/official_side_by_side.py --official_repo=DIR --device=gpu [--official_autocast=bf16 --ours_dtype=bfloat16]

The official code is imported from the checkout `--official_repo` names (github.com/amazon-far/deltatok,
e.g. `git clone` or `git archive` it somewhere); nothing of it is copied here. Its two imports that are not
model code are satisfied without it: the DINOv3 template config and backbone come from a random
`transformers` DINOv3ViTModel saved to a temporary folder at the benchmark's sizes (no download), its
image processor (which needs torchvision) by the same x/255 + ImageNet normalisation in torch, and
`training.base` (Lightning trainer, wandb; only its `load_sd` is imported by the models, for checkpoints we
never pass) is replaced by a stub module.

Configuration (both sides, fp32 unless --ours_dtype): DINOv3 width 192, 4 layers, 3 heads, patch 16, 4
registers (frozen, random); DeltaTok 4 + 4 blocks (SwiGLU 512, QK-norm, output gate, RoPE augmentation);
predictor width 192, 4 layers, 3 heads, MLP x4; 128x128 frames. Rows (batch = clips x frames):
  DeltaTok train step      8 x 2, log-cosh, AdamW (wd 0.01), grad-norm clip 0.01
  DeltaWorld train step    4 x 8, frames in (VFM + tokenizer inside the step), best-of-64, smooth-L1, AdamW
  DINO-World train step    2 x 4, frames in, learned query, smooth-L1, AdamW
  forecast                 DeltaWorld, 4 clips x 7 frames, 4 context frames, 20 samples, frames in
Official train step = forward + loss + backward (+ clip) + AdamW.step + zero_grad, as Lightning runs it;
"official" is the better of eager and torch.compile (the official trainer compiles the network; its
forecast loop is @torch.compiler.disable, so eager there). Ours = the trainer's real jitted step
(`deltaworld_jax.aot`: the trainer's build with abstract frozen modules) and the forecasters' `DeltaWorld.rollout` with the VFM in the same program.
On a GPU (`--device=gpu`): the official side runs on CUDA, and both sides multiply float32 matrices as
`--fp32_matmul` says: "tf32" (default) is what the official trainer sets (`torch.set_float32_matmul_precision
("high")` in its main.py; `jax_default_matmul_precision="tensorfloat32"` on ours), "highest" full float32 on
both. `--official_autocast=bf16` runs the official forward and loss under `torch.autocast(bfloat16)`, as its
Lightning trainer's "bf16-mixed" precision does; compare it with `--ours_dtype=bfloat16`. `--ours_attention`
picks our attention kernel (models/attention.py: "auto" is cuDNN on a GPU for bf16). Each official step ends
with `torch.cuda.synchronize()`, each of ours with `block_until_ready`; JAX does not preallocate the GPU's
memory, so both sides share it.
Timing: `--rounds` rounds; in each, every row runs official eager, official compiled, ours (in that
order), `--steps` timed steps each after warm-up. Reported: the median ms over all timed steps of a side,
with the range of per-round medians; ratio = official / ours (> 1: ours is faster).

Work and throughput (second table): the matmul FLOPs of one step, counted on our program (the traced
jaxpr of the jitted step or forecast, `flops.jaxpr_matmul_flops`, attention included), which both sides
run (the same model and configuration); the official count by `torch.utils.flop_counter` over one eager
step is printed as a cross-check (it leaves out scaled_dot_product_attention on the CPU, which the counter
does not count). From it the GFLOP/s each side reaches, and the machine's fp32 GEMM rate measured in the
same run (the better of jax and torch on a 4096^3 matmul, before and after the rounds). "Goal needs" is
the matmul rate the issue's goal (ours >= 1.5x faster than the official code, the forecast >= 2x) would
take, as a share of that GEMM rate: a goal needing more than ~70% of it over a whole step (attention,
elementwise and optimiser work included) is not reachable by scheduling or fusion on this machine, only by doing less work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np

# The repository's root: `benchmarks.step` and `configs` are imported as packages from there.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH, LAYERS, HEADS, PATCH, REGISTERS, VFM_MLP = 192, 4, 3, 16, 4, 768
TOK_LAYERS, TOK_MLP = 4, 512  # official: 2 * template intermediate // 3 for SwiGLU
FRAME = 128
ROWS = ("deltatok", "deltaworld", "dinoworld", "forecast")
ROW_TITLES = {"deltatok": "DeltaTok train step (8x2)", "deltaworld": "DeltaWorld train step, frames in (4x8, K=64)",
              "dinoworld": "DINO-World train step (2x4)", "forecast": "forecast (4 clips x 7, 20 samples, ctx 4)"}
BATCH = {"deltatok": (8, 2), "deltaworld": (4, 8), "dinoworld": (2, 4), "forecast": (4, 7)}
NUM_CANDIDATES, NUM_SAMPLES, CTX_LEN = 64, 20, 4
# issue 18's goals: ours at least this many times faster than the official code
GOALS = {"deltatok": 1.5, "deltaworld": 1.5, "dinoworld": 1.5, "forecast": 2.0}


def timestamps(b: int, t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    strides = rng.uniform(1 / 25, 1 / 3, size=(b, t - 1))
    return np.concatenate([np.zeros((b, 1)), np.cumsum(strides, 1)], 1).astype(np.float32)


def frames_uint8(b: int, t: int, seed: int = 0) -> np.ndarray:
    """[B, T, H, W, 3] uint8 (ours, channels last); the official side takes the same pixels channels first."""
    return np.random.default_rng(seed).integers(0, 256, size=(b, t, FRAME, FRAME, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Official side
# ----------------------------------------------------------------------------------------------------


class _ImageProcessor:
    """Stands in for the official `AutoImageProcessor(do_resize=False, do_center_crop=False)`, whose
    DINOv3 class needs torchvision (not installed here): the same rescale by 1/255 and ImageNet
    normalisation, in torch, on the [N, 3, H, W] batch."""

    image_mean, image_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    @classmethod
    def from_pretrained(cls, *_, **__):
        return cls()

    def __call__(self, images, return_tensors="pt"):
        import torch

        mean = torch.tensor(self.image_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, 3, 1, 1)
        return {"pixel_values": (images.float() / 255.0 - mean) / std}


class Official:
    def __init__(self, repo: str, workdir: str, device: str = "cpu", autocast: str = "none"):
        """`device`: "cpu" or "cuda"; `autocast`: "none" or "bf16" (the forward and loss under
        torch.autocast(bfloat16), as Lightning's "bf16-mixed" precision runs the official trainer)."""
        import torch
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        self.torch = torch
        self.device = torch.device(device)
        self.autocast = autocast
        torch.manual_seed(0)
        template = os.path.join(workdir, "dinov3_template")
        cfg = DINOv3ViTConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=VFM_MLP, patch_size=PATCH, num_register_tokens=REGISTERS,
                              image_size=FRAME)
        DINOv3ViTModel(cfg).save_pretrained(template)

        stub = types.ModuleType("training.base")
        stub.load_sd = lambda module, sd: module.load_state_dict(sd)  # never called: no checkpoints given
        sys.modules.setdefault("training", types.ModuleType("training"))
        sys.modules["training.base"] = stub
        sys.path.insert(0, os.path.abspath(repo))
        import models.dinov3 as dinov3_mod
        import models.predictor as predictor_mod

        dinov3_mod.AutoImageProcessor = _ImageProcessor

        predictor_mod.DINOV3_TEMPLATE = template
        import models.deltatok as deltatok_mod

        deltatok_mod.DINOV3_TEMPLATE = template
        from models.deltaworld import DeltaWorld
        from models.dinoworld import DINOWorld
        from models.dinov3 import DINOv3

        self.DINOv3, self.DeltaTok, self.DeltaWorld, self.DINOWorld = (
            lambda: DINOv3(template), deltatok_mod.DeltaTok, DeltaWorld, DINOWorld)

    def _frames(self, b, t):
        frames = self.torch.from_numpy(np.ascontiguousarray(frames_uint8(b, t).transpose(0, 1, 4, 2, 3)))
        return frames.to(self.device)

    def _autocast(self):
        """The forward pass's precision context (autocast leaves backward and the optimiser in float32)."""
        import contextlib

        if self.autocast == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _synced(self, step):
        """On CUDA the step returns once its kernels are queued: wait for them, as ours waits on its result."""
        if self.device.type != "cuda":
            return step

        def synced():
            out = step()
            self.torch.cuda.synchronize(self.device)
            return out
        return synced

    def _tokenizer(self):
        return self.DeltaTok(self.DINOv3(), num_hidden_layers=TOK_LAYERS)

    def _optimizer(self, net, lr, wd):
        """The official configure_optimizers: decay on Linear/Conv weights only, AdamW."""
        nn = self.torch.nn
        decay_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        decay = {f"{n}.weight" for n, m in net.named_modules()
                 if isinstance(m, decay_types) and getattr(m, "weight", None) is not None and m.weight.requires_grad}
        params = dict(net.named_parameters())
        groups = [{"params": [params[k] for k in sorted(decay)], "weight_decay": wd},
                  {"params": [p for k, p in sorted(params.items()) if p.requires_grad and k not in decay],
                   "weight_decay": 0.0}]
        return self.torch.optim.AdamW(groups, lr)

    def build(self, row: str, compiled: bool):
        """(trainable parameter count, step() callable)."""
        torch, F = self.torch, self.torch.nn.functional
        torch.manual_seed(0)
        b, t = BATCH[row]
        frames = self._frames(b, t)
        times = torch.from_numpy(timestamps(b, t)).to(self.device)
        if row == "deltatok":
            net = self._tokenizer()
        elif row in ("deltaworld", "forecast"):
            net = self.DeltaWorld(self._tokenizer(), predictor_hidden_size=WIDTH, predictor_num_hidden_layers=LAYERS,
                                  predictor_num_heads=HEADS, num_samples_train=NUM_CANDIDATES,
                                  num_samples_eval=NUM_SAMPLES)
        else:
            net = self.DINOWorld(self.DINOv3(), predictor_hidden_size=WIDTH, predictor_num_hidden_layers=LAYERS,
                                 predictor_num_heads=HEADS)
        net = net.to(self.device)
        count = sum(p.numel() for p in net.parameters() if p.requires_grad)
        model = torch.compile(net) if compiled else net
        if row == "forecast":
            net.eval()

            def step():
                with torch.no_grad(), self._autocast():
                    return model(frames, times, ctx_len=CTX_LEN)[0]
            return count, self._synced(step)

        net.train()  # as Lightning does each epoch: every submodule, the frozen ones included
        if row == "deltatok":
            opt, clip = self._optimizer(net, 1e-3, 0.01), 0.01

            def loss_fn():
                with self._autocast():
                    pred, tgt = model(frames)
                diff = (pred.float() - tgt.float()).abs()  # LogCoshLoss
                return (diff + F.softplus(-2.0 * diff) - np.log(2.0)).mean()
        else:
            opt, clip = self._optimizer(net, 1e-4, 0.4), 0.0
            criterion = torch.nn.SmoothL1Loss(reduction="none", beta=0.1)

            def loss_fn():
                with self._autocast():
                    pred, tgt = model(frames, times, criterion)
                return criterion(pred.float(), tgt.detach().float()).mean()

        def step():
            loss = loss_fn()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return count, self._synced(step)

    def matmul_flops(self, row: str) -> float:
        """Matmul/conv FLOPs of one eager official step (forward, backward, optimiser), counted by torch."""
        from torch.utils.flop_counter import FlopCounterMode

        _, step = self.build(row, compiled=False)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------------


def our_config(row: str, dtype: str, attention: str = ""):
    """Our config of `row`; `attention`: the attention kernel of every module (empty: the configs' default)."""
    import ml_collections

    from configs import common

    c = common.base_config()
    c.model.dtype = dtype
    attention = attention or c.model.attention_impl
    c.model.attention_impl = attention
    c.vfm = ml_collections.ConfigDict(dict(
        kind="dinov3", preset="vitb16", weights="", dtype=dtype, attention_impl=attention,
        overrides=dict(hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS, intermediate_size=VFM_MLP,
                       num_register_tokens=REGISTERS, patch_size=PATCH)))
    b, t = BATCH[row]
    c.data = ml_collections.ConfigDict(dict(num_frames=t, frame_size=FRAME))
    c.train.batch_size = b
    world = dict(hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS, backbone_hidden_size=WIDTH, mlp_ratio=4)
    if row == "deltatok":
        c.model.update(dict(kind="deltatok", num_layers=TOK_LAYERS, intermediate_size=TOK_MLP))
        c.optim.update(dict(lr=1e-3, weight_decay=0.01, grad_clip_norm=0.01))
    elif row in ("deltaworld", "forecast"):
        c.model.update(dict(kind="deltaworld", rope_axis_sizes=(60,), rope_unrotated_size=4,
                            num_samples_train=NUM_CANDIDATES, num_samples_eval=NUM_SAMPLES, bom_chunk=0, **world))
        c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", allow_random=True, dtype=dtype,
                                                     attention_impl=attention,
                                                     num_layers=TOK_LAYERS, intermediate_size=TOK_MLP))
        c.optim.update(dict(lr=1e-4, weight_decay=0.4, grad_clip_norm=0.0))
    else:
        c.model.update(dict(kind="dinoworld", rope_axis_sizes=(20, 20, 20), rope_unrotated_size=4, use_bom=False,
                            **world))
        c.optim.update(dict(lr=1e-4, weight_decay=0.4, grad_clip_norm=0.0))
    return c


def build_ours(row: str, dtype: str, attention: str = ""):
    """(trainable parameter count, compile seconds, step() callable, matmul FLOPs of one step)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.step import compile_step, materialize, random_batch
    from deltaworld_jax import aot as program, flops as flops_lib, sharding as sharding_lib
    from deltaworld_jax.training import trainer

    cfg = program.benchmark_config(our_config(row, dtype, attention))
    mesh = sharding_lib.make_mesh(cfg.mesh)
    setup = trainer.build(cfg, mesh, abstract_frozen=True)
    count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params)))
    state, frozen = materialize(setup, cfg)
    b, t = BATCH[row]
    if row == "forecast":
        from deltaworld_jax.tasks.world import black_features

        modules = setup.task.build_frozen()
        world = nnx.merge(setup.graphdef, state.params, state.extra) if state.extra else nnx.merge(
            setup.graphdef, state.params)
        vfm, tokenizer = modules["vfm"], modules["tokenizer"]
        grid = (FRAME // PATCH, FRAME // PATCH)

        @nnx.jit
        def forecast(world, vfm, tokenizer, frames, times, rng):
            feats = vfm(frames)
            return world.rollout(tokenizer, feats, times, grid_hw=grid, ctx_len=CTX_LEN, rng=rng,
                                 num_samples=NUM_SAMPLES, black_bnd=black_features(vfm, frames))[0]

        frames, times = jnp.asarray(frames_uint8(b, t)), jnp.asarray(timestamps(b, t))
        key = jax.random.key(0)
        t0 = time.perf_counter()
        jax.block_until_ready(forecast(world, vfm, tokenizer, frames, times, key))
        compile_s = time.perf_counter() - t0
        flops = flops_lib.jaxpr_matmul_flops(forecast, world, vfm, tokenizer, frames, times, key)[0]
        return (count, compile_s, lambda: jax.block_until_ready(forecast(world, vfm, tokenizer, frames, times, key)),
                flops)

    batch = random_batch(cfg, mesh)
    batch["frames"] = jax.device_put(frames_uint8(b, t), batch["frames"].sharding)
    key = jax.random.PRNGKey(0)
    compiled, compile_s = compile_step(setup, cfg, state, frozen, batch, key)
    _, jitted = program.build_jitted_step(setup, cfg, jax.tree.map(lambda x: x.sharding, batch))
    with jax.set_mesh(setup.mesh):
        flops = flops_lib.jaxpr_matmul_flops(jitted, state, frozen, batch, key)[0]
    box = {"state": state}

    def step():
        box["state"], metrics = compiled(box["state"], frozen, batch, key)
        return jax.block_until_ready(metrics["loss"])
    return count, compile_s, step, flops


def gemm_gflops(size: int = 4096, repeats: int = 5, torch_device: str = "cpu") -> dict[str, float]:
    """The machine's fp32 GEMM rate, GFLOP/s: the best of `repeats` size^3 matmuls, in jax (on its default
    device) and in torch (on `torch_device`), at the float32 matmul precision each side was set to."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a).to(torch_device), torch.from_numpy(b).to(torch_device)

    def torch_matmul():
        out = ta @ tb
        if out.is_cuda:
            torch.cuda.synchronize()
        return out
    out = {}
    for name, fn in (("jax", lambda: matmul(ja, jb).block_until_ready()), ("torch", torch_matmul)):
        best_ms = min(timed(fn, repeats, warmup=1))
        out[name] = 2 * size ** 3 / best_ms / 1e6
    return out


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def configure_device(device: str, fp32_matmul: str) -> tuple[str, int]:
    """Set both frameworks up for `device` before jax starts; returns (torch's device, GEMM probe size).

    GPU: jax must not preallocate most of the GPU's memory (its default), or torch, in the same process, would
    run out; float32 matmuls on both sides as `fp32_matmul` says. CPU: jax on its CPU backend whatever its
    build's default."""
    if device == "cpu":
        # Pinned before jax starts (nothing has imported it yet): on a machine with a GPU or TPU build of jax its
        # default backend would be the accelerator, and ours would be timed there against torch on the CPU.
        os.environ["JAX_PLATFORMS"] = "cpu"
        return "cpu", 4096
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device=gpu: torch sees no CUDA device")
    if jax.default_backend() != "gpu":
        raise SystemExit(f"--device=gpu: jax's default backend is {jax.default_backend()!r}, not 'gpu' "
                         f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}; a CUDA jax plugin installed?)")
    torch.set_float32_matmul_precision("high" if fp32_matmul == "tf32" else "highest")
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if fp32_matmul == "tf32" else "highest")
    return "cuda", 8192


def timed(step, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def fmt_range(per_round: list[float]) -> str:
    lo, hi = min(per_round), max(per_round)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official_repo", required=True, help="a checkout of github.com/amazon-far/deltatok")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    p.add_argument("--official_modes", default="eager,compile",
                   help="eager and/or compile (torch.compile); empty: ours only (no ratio), e.g. to compare XLA flags")
    p.add_argument("--ours_dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ours_attention", default="", help="our attention kernel (models/attention.py: auto, xla, "
                   "cudnn, splash, reference); empty: the configs' default")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="where both sides run: the CPU, or the first GPU (torch on CUDA, jax's GPU backend)")
    p.add_argument("--fp32_matmul", default="tf32", choices=("tf32", "highest"),
                   help="GPU only: float32 matmuls on both sides as TF32 (the official trainer's setting) or full float32")
    p.add_argument("--official_autocast", default="none", choices=("none", "bf16"),
                   help="the official forward and loss under torch.autocast(bfloat16) (Lightning's bf16-mixed)")
    p.add_argument("--gemm_size", type=int, default=0, help="side of the GEMM-rate probe (default 4096 on the "
                   "CPU, 8192 on a GPU)")
    p.add_argument("--json_out", default="")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.official_repo, "models")):
        raise SystemExit(f"--official_repo={args.official_repo!r} is not a checkout of amazon-far/deltatok "
                         "(no models/ folder)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {ROWS}")
    modes = [m.strip() for m in args.official_modes.split(",") if m.strip()]
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("the official side (and the GEMM probe) runs on PyTorch, which is not installed here: "
                         "pip install torch==2.13.0, as .ci/run installs it")
    torch_device, gemm_size = configure_device(args.device, args.fp32_matmul)
    gemm_size = args.gemm_size or gemm_size

    import torch
    import jax

    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch_device == "cuda" else ""
    print(f"machine: {os.cpu_count()} CPUs{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads) on "
          f"{torch_device}, jax {jax.__version__} on {jax.devices()[0].device_kind}; load {os.getloadavg()}; "
          f"official autocast {args.official_autocast}, ours {args.ours_dtype}, fp32 matmul "
          f"{args.fp32_matmul if torch_device == 'cuda' else 'full'}", flush=True)
    official = Official(args.official_repo, tempfile.mkdtemp(prefix="official_side_by_side_"), torch_device,
                        args.official_autocast) if modes else None
    sides: dict[str, dict] = {}
    for row in rows:
        sides[row] = {}
        for mode in modes:
            t0 = time.perf_counter()
            count, step = official.build(row, compiled=(mode == "compile"))
            step()  # torch.compile compiles on the first call
            sides[row][f"official_{mode}"] = {"params": count, "step": step, "ms": [], "round_medians": [],
                                              "first_call_s": time.perf_counter() - t0}
        count, compile_s, step, flops = build_ours(row, args.ours_dtype, args.ours_attention)
        sides[row]["ours"] = {"params": count, "step": step, "ms": [], "round_medians": [], "compile_s": compile_s,
                              "matmul_flops": flops}
        if official is not None:
            official_flops = official.matmul_flops(row)
            for mode in modes:
                sides[row][f"official_{mode}"]["matmul_flops"] = official_flops
        counts = {name: s["params"] for name, s in sides[row].items()}
        print(f"{row}: trainable parameters {counts}; ours compiled in {compile_s:.1f} s; official first call "
              + ", ".join(f"{n} {s['first_call_s']:.1f} s" for n, s in sides[row].items() if "first_call_s" in s),
              flush=True)
        if len(set(counts.values())) > 1:
            raise SystemExit(f"{row}: trainable parameter counts differ: {counts}")

    gemm = gemm_gflops(gemm_size, torch_device=torch_device)  # again after the rounds; the better of the two counts
    print(f"fp32 GEMM {gemm_size}^3: {gemm['jax']:.0f} GFLOP/s (jax), {gemm['torch']:.0f} GFLOP/s (torch)", flush=True)
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for row in rows:
            for name, side in sides[row].items():
                ms = timed(side["step"], args.steps, args.warmup)
                side["ms"] += ms
                side["round_medians"].append(statistics.median(ms))
        print(f"round {r + 1}/{args.rounds} done; load {os.getloadavg()}", flush=True)

    gemm = {k: max(v, gemm[k]) for k, v in gemm_gflops(gemm_size, torch_device=torch_device).items()}
    gemm_peak = max(gemm.values())
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "jax": jax.__version__, "device": args.device, "device_kind": jax.devices()[0].device_kind,
                           "load_1min_per_round": loads, "fp32_gemm_gflops": gemm, "gemm_size": gemm_size},
               "config": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                          "ours_dtype": args.ours_dtype, "ours_attention": args.ours_attention,
                          "official_modes": modes, "official_autocast": args.official_autocast,
                          "fp32_matmul": args.fp32_matmul if args.device == "gpu" else "full"}, "rows": {}}
    official_label = " / ".join(modes) + (", bf16 autocast" if args.official_autocast == "bf16" else "")
    ours_label = args.ours_dtype + (f", {args.ours_attention} attention" if args.ours_attention else "")
    lines = [f"| | official ({official_label}) | ours ({ours_label}) | official / ours |", "|---|---|---|---|"]
    for row in rows:
        entry = {name: {k: v for k, v in s.items() if k != "step"} | {"median_ms": statistics.median(s["ms"])}
                 for name, s in sides[row].items()}
        official_names = [n for n in entry if n.startswith("official")]
        best = min(official_names, key=lambda n: entry[n]["median_ms"]) if official_names else None
        ratio = entry[best]["median_ms"] / entry["ours"]["median_ms"] if best else float("nan")
        entry["official_best"] = best
        entry["ratio_official_over_ours"] = ratio
        results["rows"][row] = entry
        off = " / ".join(f"{entry[n]['median_ms']:.0f} ({fmt_range(entry[n]['round_medians'])})" for n in official_names)
        lines.append(f"| {ROW_TITLES[row]} | {off} | {entry['ours']['median_ms']:.0f} "
                     f"({fmt_range(entry['ours']['round_medians'])}) | {ratio:.2f} |")
    print("\nmedian ms per step (range of per-round medians); official / ours uses the better official mode")
    print("\n".join(lines))
    print(f"\nmatmul work per step and the rate each side reaches; the machine's fp32 GEMM rate: {gemm_peak:.0f} GFLOP/s "
          f"({gemm_size}^3, the better of jax and torch)")
    print("| | matmul GFLOP/step (ours; torch's counter on the official step) | official GFLOP/s | ours GFLOP/s | goal "
          "| goal needs GFLOP/s (share of GEMM rate) |\n|---|---|---|---|---|---|")
    for row in rows:
        entry = results["rows"][row]
        ours_flops = entry["ours"]["matmul_flops"]
        ours_rate = ours_flops / entry["ours"]["median_ms"] / 1e6
        best = entry["official_best"]
        goal = GOALS[row]
        if best:
            off_ms = entry[best]["median_ms"]
            needed = ours_flops / (off_ms / goal) / 1e6
            entry["throughput"] = {"official_gflops_per_s": ours_flops / off_ms / 1e6, "ours_gflops_per_s": ours_rate,
                                   "goal": goal, "goal_needs_gflops_per_s": needed,
                                   "goal_needs_share_of_gemm": needed / gemm_peak}
            print(f"| {ROW_TITLES[row]} | {ours_flops / 1e9:.1f} ({entry[best]['matmul_flops'] / 1e9:.1f}) | "
                  f"{ours_flops / off_ms / 1e6:.0f} | {ours_rate:.0f} | {goal}x | {needed:.0f} ({100 * needed / gemm_peak:.0f}%) |")
        else:
            entry["throughput"] = {"ours_gflops_per_s": ours_rate}
            print(f"| {ROW_TITLES[row]} | {ours_flops / 1e9:.1f} | | {ours_rate:.0f} | {goal}x | |")
    print(f"load average (1 min) at the start of each round: {', '.join(f'{x:.1f}' for x in loads)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
