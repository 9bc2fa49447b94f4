"""MFU for the training loop: model FLOPs per optimiser step x steps/s / the peak FLOP/s of the devices.

The peak is the dense bf16 peak per device kind (PEAK_BF16_TFLOPS) times the devices of the mesh; on a
device kind not in the table (a CPU, an unknown accelerator) there is no MFU, only the model FLOP/s.
The FLOPs per step are the analytic counts of deltaworld_jax/flops.py for the sizes of the modules the
trainer built (model_dims); a model without a count (e.g. DeltaWorld without best-of-K) logs no MFU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
from flax import nnx

from deltaworld_jax import flops
from deltaworld_jax.models import basic_layers, dinov3
from deltaworld_jax.models.deltatok import DeltaTok
from deltaworld_jax.models.predictor import Predictor

# Dense bf16 peak FLOP/s per device (datasheets). TPU v4/v5p devices are whole chips (megacore).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p reports device_kind "TPU v5"
    "TPU v6 lite": 918.0,  # v6e
    "TPU v6e": 918.0,
}


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where no peak is known (CPUs: report FLOP/s only)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_BF16_TFLOPS[name] * 1e12
    return None


# ----------------------------------------------------------------------------------------------------
# The sizes of the modules a config builds, for the analytic counts (deltaworld_jax/flops.py)
# ----------------------------------------------------------------------------------------------------


def find_modules(roots: list[Any], cls: type) -> list[Any]:
    found = []
    for root in roots:
        if root is None:
            continue
        for _, node in nnx.iter_graph(root):
            if isinstance(node, cls) and not any(node is f for f in found):
                found.append(node)
    return found


def first(roots: list[Any], cls) -> Any:
    found = find_modules(roots, cls)
    return found[0] if found else None


def params_of(node) -> int:
    return 0 if node is None else basic_layers.count_params(node)


def vfm_dims(vfm) -> flops.VFMDims:
    if isinstance(vfm, dinov3.DINOv3):
        c = vfm.config
        return flops.VFMDims(
            flops.StackDims(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, bool(c.use_gated_mlp)),
            c.patch_size, 1 + c.num_register_tokens)
    # The pixel-patch VFM has no parameters and does no matmuls: features are the pixels themselves.
    return flops.VFMDims(flops.StackDims(vfm.hidden_size, 0, vfm.num_heads, 0), vfm.patch_size, 0,
                             patch_embed=False)


def tokenizer_dims(tok: DeltaTok) -> flops.StackDims:
    c = tok.cfg
    return flops.StackDims(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, bool(c.use_swiglu),
                               bool(c.use_gated_attn))


def predictor_dims(pred: Predictor) -> flops.PredictorDims:
    c = pred.cfg
    return flops.PredictorDims(c.hidden_size, c.num_layers, c.num_heads, c.hidden_size * c.mlp_ratio,
                                   c.backbone_hidden_size, c.backbone_hidden_size)


def vfm_module(roots):
    return first(roots, dinov3.DINOv3) or first(roots, dinov3.PixelPatchVFM)


def component_params(trainable, frozen) -> dict[str, int]:
    """Parameters per component: VFM, DeltaTok encoder (blocks, z/xy embeddings, token norm), DeltaTok
    decoder, predictor, and the trained total."""
    roots = [trainable, frozen]
    out: dict[str, int] = {}
    vfm = vfm_module(roots)
    if vfm is not None:
        out["vfm"] = params_of(vfm)
    tok = first(roots, DeltaTok)
    if tok is not None:
        decoder = sum(params_of(b) for b in tok.decoder_blocks)
        out["deltatok encoder"] = params_of(tok) - decoder
        out["deltatok decoder"] = decoder
    pred = first(roots, Predictor)
    if pred is not None:
        out["predictor"] = params_of(pred)
    out["trained (total)"] = params_of(trainable)
    return out


@dataclasses.dataclass
class ModelDims:
    kind: str
    vfm: flops.VFMDims | None
    tokenizer: flops.StackDims | None
    predictor: flops.PredictorDims | None
    params: dict[str, int]
    num_candidates: int = 0  # best-of-K during training (DeltaWorld)


def model_dims(config, trainable_module, frozen_modules) -> ModelDims:
    """The sizes the analytic counts read, found by type in the trainable and frozen modules (abstract or
    concrete; a frozen tuple/dict of VFM and tokenizer, a world model holding a predictor, ...)."""
    roots = [trainable_module, frozen_modules]
    vfm = vfm_module(roots)
    tok = first(roots, DeltaTok)
    pred = first(roots, Predictor)
    world_cfg = getattr(trainable_module, "cfg", None)
    use_bom = bool(getattr(world_cfg, "use_bom", False))
    k = int(getattr(world_cfg, "num_samples_train", 0)) if use_bom else 0
    return ModelDims(
        kind=config.model.kind,
        vfm=vfm_dims(vfm) if vfm is not None else None,
        tokenizer=tokenizer_dims(tok) if tok is not None else None,
        predictor=predictor_dims(pred) if pred is not None else None,
        params=component_params(trainable_module, frozen_modules),
        num_candidates=k,
    )


def train_step_flops(dims: ModelDims, frame_hw, batch: int, clip_frames: int, from_tokens: bool = False,
                     official: bool = True):
    """Analytic FLOPs of one step. official=False counts what OUR implementation computes where it differs
    from the official code (DeltaWorld: the black frame's VFM features once per step, not once per clip)."""
    if dims.kind == "deltatok":
        return flops.deltatok_train_step(dims.vfm, dims.tokenizer, frame_hw, batch, clip_frames=clip_frames)
    if dims.kind == "deltaworld":
        if dims.num_candidates == 0:
            raise ValueError("the analytic DeltaWorld step assumes best-of-K training (use_bom=True)")
        return flops.deltaworld_train_step(dims.vfm, dims.tokenizer, dims.predictor, frame_hw, batch,
                                               clip_frames=clip_frames, num_candidates=dims.num_candidates,
                                               from_tokens=from_tokens, black_frames=None if official else 1)
    if dims.kind == "dinoworld":
        return flops.dinoworld_train_step(dims.vfm, dims.predictor, frame_hw, batch, clip_frames=clip_frames)
    raise ValueError(f"no analytic FLOPs for model kind {dims.kind!r}")


def analytic_step_flops(config, trainable_module, frozen_modules) -> float:
    """Model FLOPs of one optimiser step of `config.train.batch_size` clips (accumulation included): what OUR
    step computes (official=False; no recompute, so remat shows as lower MFU)."""
    dims = model_dims(config, trainable_module, frozen_modules)
    size = config.data.frame_size
    frame_hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    from_tokens = bool(config.data.get("token_cache", ""))  # DeltaWorld from cached tokens: no VFM, no tokenizer
    return float(flops.total(train_step_flops(dims, frame_hw, int(config.train.batch_size),
                                              int(config.data.num_frames), from_tokens, official=False)))


class MFUMeter:
    """`meter(steps_per_second)` -> {"model_tflops_per_second", "mfu" (only with a known peak)}; {} when
    there are no FLOPs for the config."""

    def __init__(self, flops_per_step: float | None, peak_flops_total: float | None):
        self.flops_per_step = flops_per_step
        self.peak_flops_total = peak_flops_total

    @classmethod
    def for_training(cls, config, mesh, trainable_module, frozen_modules) -> "MFUMeter":
        """From the trainer's modules and mesh; never raises (logs why there is no MFU)."""
        devices = list(mesh.devices.flat)
        peak = peak_flops(devices[0])
        peak_total = peak * len(devices) if peak else None
        try:
            flops = analytic_step_flops(config, trainable_module, frozen_modules)
        except (ValueError, AttributeError, KeyError, TypeError) as e:
            logging.info("No MFU: no analytic FLOPs for this config (%s)", e)
            return cls(None, peak_total)
        return cls(flops, peak_total)

    def __call__(self, steps_per_second: float) -> dict[str, Any]:
        if self.flops_per_step is None:
            return {}
        achieved = self.flops_per_step * steps_per_second
        out = {"model_tflops_per_second": achieved / 1e12}
        if self.peak_flops_total:
            out["mfu"] = achieved / self.peak_flops_total
        return out
