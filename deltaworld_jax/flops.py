"""FLOPs of DeltaTok, DeltaWorld and DINO-World: analytic (from the model sizes) and counted (from programs).

Three independent counts, so each can check the others:
  * `analytic`: closed-form matmul FLOPs (2*m*n*k per matmul; attention's QK^T and AV included) of what
    the OFFICIAL code computes per training step or per forecast, from the model sizes alone.
  * `jaxpr_matmul_flops`: the dot_general / conv FLOPs of a traced program (any jitted function, e.g. the
    trainer's real step), walking into scans (times their length), conds and nested calls.
  * `xla_flops`: XLA's own cost analysis of the compiled program (all ops, elementwise included). XLA
    visits a while-loop body ONCE whatever its trip count, and on a mesh it reports ONE device's share;
    `xla_flops` says so by returning the number of loops it saw.

Training FLOPs count the backward of a trained matmul as twice its forward (gradient w.r.t. the input and
w.r.t. the weight), so fwd+bwd = 3x fwd; a matmul whose input needs no gradient (the predictor's kv_proj on
frozen tokens, whose weight still trains) costs 2x. Frozen modules (VFM, the tokenizer inside DeltaWorld)
and the best-of-K candidate search run forward only. Elementwise work (norms, softmax, RoPE, activations,
the optimiser) is left out of the analytic count; it is a few percent at ViT-B sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.extend

Breakdown = dict[str, float]


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StackDims:
    """A stack of DINOv3-style self-attention blocks (the VFM's, or one of DeltaTok's two stacks)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    gated_mlp: bool = False  # SwiGLU: three MLP matrices instead of two
    output_gate: bool = False  # DeltaTok's per-head sigmoid gate: a Linear(hidden -> heads)


@dataclasses.dataclass(frozen=True)
class VFMDims:
    stack: StackDims
    patch_size: int = 16
    num_prefix: int = 5  # DINOv3: 1 CLS + 4 register tokens (the pixel VFM: 0)
    patch_embed: bool = True  # False: the pixel-patch VFM (features are the pixels: no matmul at all)

    def num_patches(self, frame_hw: tuple[int, int]) -> int:
        h, w = frame_hw
        return (h // self.patch_size) * (w // self.patch_size)


@dataclasses.dataclass(frozen=True)
class PredictorDims:
    hidden: int
    layers: int
    heads: int
    mlp: int
    kv_width: int  # width of the key/value tokens (the VFM's)
    out_width: int  # width of the head's output (the VFM's)


# ----------------------------------------------------------------------------------------------------
# Building blocks (forward FLOPs of ONE sequence)
# ----------------------------------------------------------------------------------------------------


def stack_forward(tokens: int, d: StackDims) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of `d.layers` self-attention blocks over `tokens` tokens."""
    per_token = 4 * d.hidden * d.hidden + (3 if d.gated_mlp else 2) * d.hidden * d.mlp
    if d.output_gate:
        per_token += d.hidden * d.heads
    linear = 2.0 * tokens * per_token
    attention = 2.0 * 2 * tokens * tokens * d.hidden  # QK^T and AV, all heads together
    return d.layers * linear, d.layers * attention


def vfm_frame_forward(v: VFMDims, frame_hw: tuple[int, int]) -> float:
    """One frame through the VFM: patch embedding + blocks over prefix + patch tokens."""
    n = v.num_patches(frame_hw)
    if not v.patch_embed:
        return 0.0
    patch_embed = 2.0 * n * (3 * v.patch_size**2) * v.stack.hidden
    return patch_embed + sum(stack_forward(n + v.num_prefix, v.stack))


def encode_forward(t: StackDims, num_patches: int) -> float:
    """DeltaTok encode: [z, x + e0, y + e1] through the encoder stack."""
    return sum(stack_forward(1 + 2 * num_patches, t))


def decode_forward(t: StackDims, num_patches: int) -> float:
    """DeltaTok decode: [z, x] through the decoder stack."""
    return sum(stack_forward(1 + num_patches, t))


def predictor_forward(p: PredictorDims, num_queries: int, num_kv: int) -> tuple[float, float, float]:
    """(query-side linears incl. head, kv_proj, attention) forward FLOPs of one predictor pass."""
    query_side = p.layers * 2.0 * num_queries * (2 * p.hidden * p.hidden + 2 * p.hidden * p.mlp)
    query_side += 2.0 * num_queries * p.hidden * p.out_width
    kv_proj = p.layers * 2.0 * num_kv * p.kv_width * 2 * p.hidden
    attention = p.layers * 2.0 * 2 * num_queries * num_kv * p.hidden
    return query_side, kv_proj, attention


def predictor_train(p: PredictorDims, num_queries: int, num_kv: int) -> float:
    """Forward + backward of one predictor pass whose key/value tokens are frozen (kv_proj: 2x, rest 3x)."""
    query_side, kv_proj, attention = predictor_forward(p, num_queries, num_kv)
    return 3 * query_side + 2 * kv_proj + 3 * attention


# ----------------------------------------------------------------------------------------------------
# Training steps (per step, for `batch` clips)
# ----------------------------------------------------------------------------------------------------


def deltatok_train_step(vfm: VFMDims, tok: StackDims, frame_hw, batch: int, clip_frames: int = 2) -> Breakdown:
    """The official DeltaTok step: VFM on every frame of the clip, encode + decode of the last pair with
    gradients (fwd + bwd = 3x fwd)."""
    n = vfm.num_patches(frame_hw)
    return {
        "vfm (fwd)": batch * clip_frames * vfm_frame_forward(vfm, frame_hw),
        "deltatok encode (fwd+bwd)": batch * 3 * encode_forward(tok, n),
        "deltatok decode (fwd+bwd)": batch * 3 * decode_forward(tok, n),
    }


def deltaworld_train_step(vfm: VFMDims, tok: StackDims, pred: PredictorDims, frame_hw, batch: int,
                          clip_frames: int = 8, num_candidates: int = 256, from_tokens: bool = False,
                          black_frames: int | None = None) -> Breakdown:
    """The official DeltaWorld step: VFM on the clip's frames AND one all-black frame per clip, the
    tokenizer's encode of every pair (black, f0), (f0, f1), ..., the best-of-K search (forward only, all
    (T-1)*K candidate queries against the T-1 context tokens), and the chosen queries' pass with gradients.
    `from_tokens`: the cached-token path (no VFM, no tokenizer). `black_frames`: VFM passes of the black
    frame per step (official: one per clip = batch; our world task computes it once per step = 1)."""
    n = vfm.num_patches(frame_hw)
    q = clip_frames - 1
    black = batch if black_frames is None else black_frames
    out: Breakdown = {}
    if not from_tokens:
        out["vfm (fwd, T frames + black)"] = (batch * clip_frames + black) * vfm_frame_forward(vfm, frame_hw)
        out["deltatok encode (fwd, T pairs)"] = batch * clip_frames * encode_forward(tok, n)
    out["predictor best-of-K search (fwd)"] = batch * sum(predictor_forward(pred, q * num_candidates, q))
    out["predictor chosen (fwd+bwd)"] = batch * predictor_train(pred, q, q)
    return out


def dinoworld_train_step(vfm: VFMDims, pred: PredictorDims, frame_hw, batch: int, clip_frames: int = 8) -> Breakdown:
    """The official DINO-World step: VFM on every frame; one learned query per patch of frames 1..T-1
    against all patches of frames 0..T-2 (the frame-causal mask does not reduce the matmuls)."""
    n = vfm.num_patches(frame_hw)
    q = clip_frames - 1
    return {
        "vfm (fwd)": batch * clip_frames * vfm_frame_forward(vfm, frame_hw),
        "predictor (fwd+bwd)": batch * predictor_train(pred, q * n, q * n),
    }


# ----------------------------------------------------------------------------------------------------
# Forecasts (per clip and crop; multiply by the crops per frame)
# ----------------------------------------------------------------------------------------------------


def deltaworld_forecast(vfm: VFMDims, tok: StackDims, pred: PredictorDims, frame_hw, *, context: int = 4,
                        horizon: int = 3, samples: int = 20, official_eval: bool = True) -> Breakdown:
    """One DeltaWorld forecast: `samples` rollouts of `horizon` steps from `context` frames.

    official_eval=True counts what the official evaluation runs (`rollout_init` pushes all
    context + horizon frames through the VFM and the tokenizer, since the targets' features are needed for
    the metrics); False counts only the forecast itself (VFM and tokens of the context frames)."""
    n = vfm.num_patches(frame_hw)
    frames = context + horizon if official_eval else context
    out: Breakdown = {
        "vfm (frames + black)": (frames + 1) * vfm_frame_forward(vfm, frame_hw),
        "deltatok encode": frames * encode_forward(tok, n),
    }
    out["predictor"] = sum(samples * sum(predictor_forward(pred, 1, context + step)) for step in range(horizon))
    out["deltatok decode (per sample per step)"] = horizon * samples * decode_forward(tok, n)
    return out


def dinoworld_forecast(vfm: VFMDims, pred: PredictorDims, frame_hw, *, context: int = 4, horizon: int = 3,
                       official_eval: bool = True) -> Breakdown:
    """One DINO-World forecast (deterministic, one rollout): each step predicts all patches of the next
    frame from all patches of the frames so far."""
    n = vfm.num_patches(frame_hw)
    frames = context + horizon if official_eval else context
    return {
        "vfm": frames * vfm_frame_forward(vfm, frame_hw),
        "predictor": sum(sum(predictor_forward(pred, n, (context + step) * n)) for step in range(horizon)),
    }


def total(breakdown: Breakdown) -> float:
    return float(sum(breakdown.values()))


# ----------------------------------------------------------------------------------------------------
# Counting FLOPs of programs
# ----------------------------------------------------------------------------------------------------


def _dot_general_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    contract = math.prod(lhs_shape[i] for i in lhs_contract)
    return 2.0 * math.prod(out_shape) * contract


def _conv_flops(eqn) -> float:
    dn = eqn.params["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    # The kernel's input-feature dim and spatial dims are contracted for every output element.
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
    per_output = rhs_shape[rhs_spec[1]] * math.prod(rhs_shape[i] for i in rhs_spec[2:])
    return 2.0 * math.prod(out_shape) * per_output


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _count(jaxpr, stats: dict[str, int]) -> float:
    flops = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            flops += _conv_flops(eqn)
        elif name == "scan":
            flops += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, stats)
        elif name == "cond":
            flops += max(_count(branch.jaxpr, stats) for branch in eqn.params["branches"])
        elif name == "while":
            stats["while_loops"] = stats.get("while_loops", 0) + 1  # trip count unknown: body counted once
            flops += _count(eqn.params["body_jaxpr"].jaxpr, stats)
        else:
            flops += sum(_count(sub, stats) for sub in _sub_jaxprs(eqn.params))
    return flops


def jaxpr_matmul_flops(fn, *args, **kwargs) -> tuple[float, dict[str, int]]:
    """Matmul + conv FLOPs of `fn(*args)` (abstract args welcome), scans counted `length` times.
    Returns (flops, stats) where stats["while_loops"] counts loops of unknown trip count (counted once)."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    stats: dict[str, int] = {}
    return _count(closed.jaxpr, stats), stats


def xla_flops(compiled) -> tuple[float, int]:
    """(FLOPs, number of while loops in the optimised HLO) from a compiled program's cost analysis.

    The FLOPs are per device (one device's shard of an SPMD program) and count a while-loop body once."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0]
    loops = compiled.as_text().count(" while(")
    return float(cost.get("flops", 0.0)), loops


def format_flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} FLOP"


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)

