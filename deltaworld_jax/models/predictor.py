"""The world models' predictor: a stack of cross-attention blocks (queries attend ONLY to key/value tokens),
and the query machinery shared by DeltaWorld and DINO-World (frame-causal mask, noise queries, best-of-K).

Official semantics (amazon-far/deltatok models/predictor.py, models/world.py):
  block:  q = q + ls1(cross_attn(norm1(q), kv)); q = q + ls2(mlp(norm2(q)))
  cross_attn: q_proj on the normed queries, ONE kv_proj (backbone width -> 2 * hidden, split k then v) on
          the RAW key/value tokens, axis RoPE on q and k, out_proj; no self-attention among queries.
  norms:  torch nn.LayerNorm defaults (eps 1e-5, with bias); MLP: exact GELU, ratio 4; LayerScale 1e-5.
  output: head(norm(q)), head = Linear(hidden -> backbone width).
Because queries never attend to each other, any number of independent queries (K candidates, S samples)
can share one pass: that is what makes best-of-K one batched program here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models import basic_layers, block_stack, blocks, rope
from deltaworld_jax.models.attention import FrameCausalMask, frame_causal_mask  # noqa: F401 (re-exported)
from deltaworld_jax.objectives import smooth_l1

Array = jax.Array
Positions = tuple[Array, ...]


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Sizes of the predictor. Defaults: the released DeltaWorld (ViT-B/16 DINOv3 tokens)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    backbone_hidden_size: int = 768  # width of the key/value tokens and of the output
    mlp_ratio: int = 4
    rope_axis_sizes: tuple[int, ...] = (60,)
    rope_unrotated_size: int = 4
    layer_scale_init: float = 1e-5
    norm_eps: float = 1e-5
    init_std: float = 0.02  # the backbone's initializer_range; also the scale of the noise queries
    attention_impl: str | None = "xla"  # models/attention.py
    remat: str = block_stack.DEFAULT_REMAT  # rematerialisation of the scanned block: block_stack.REMAT_POLICIES
    # Layout of the blocks: False, per-layer (`blocks.{i}`, the official names); True, one
    # block_stack.BlockStack (`blocks.stacked`, [num_layers, ...] parameters; a shorter compile).
    scan_layers: bool = False

    def __post_init__(self):
        block_stack.check_remat(self.remat)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        rope_total = sum(self.rope_axis_sizes) + self.rope_unrotated_size
        if rope_total != head_dim:
            raise ValueError(
                f"RoPE sizes must sum to head_dim: {tuple(self.rope_axis_sizes)} + {self.rope_unrotated_size} "
                f"= {rope_total}, but head_dim = {self.hidden_size} // {self.num_heads} = {head_dim}")
        if any(size % 2 for size in self.rope_axis_sizes):
            raise ValueError(f"every RoPE axis size must be even (rotate-half), got {self.rope_axis_sizes}")


class PredictorBlock(nnx.Module):
    """norm1 -> attention (cross) -> layer_scale1 -> residual; norm2 -> mlp -> layer_scale2 -> residual."""

    def __init__(self, cfg: PredictorConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        nkw = dict(eps=cfg.norm_eps, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = basic_layers.LayerNorm(d, **nkw)
        self.attention = blocks.CrossAttention(
            d, cfg.backbone_hidden_size, cfg.num_heads, rope_axis_sizes=tuple(cfg.rope_axis_sizes),
            rope_unrotated_size=cfg.rope_unrotated_size, init_std=cfg.init_std,
            implementation=cfg.attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale1 = basic_layers.LayerScale(d, init_value=cfg.layer_scale_init, param_dtype=param_dtype,
                                              rngs=rngs)
        self.norm2 = basic_layers.LayerNorm(d, **nkw)
        self.mlp = basic_layers.MLP(d, d * cfg.mlp_ratio, act="gelu", init_std=cfg.init_std, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.layer_scale2 = basic_layers.LayerScale(d, init_value=cfg.layer_scale_init, param_dtype=param_dtype,
                                              rngs=rngs)

    def __call__(self, queries: Array, kv_tokens: Array, rope_q: rope.AxisRopeTables,
                 rope_k: rope.AxisRopeTables, mask: FrameCausalMask | Array | None) -> Array:
        # Each LayerScale folded into its branch's last projection (basic_layers.scaled_linear: a cheaper gradient).
        queries = queries + self.attention(self.norm1(queries), kv_tokens, rope_q, rope_k, mask,
                                           out_scale=self.layer_scale1.lambda1[...])
        return queries + self.mlp(self.norm2(queries), out_scale=self.layer_scale2.lambda1[...])


class Predictor(nnx.Module):
    """blocks[i] (PredictorBlock; block_stack.run_blocks: unrolled, or one scan when stored stacked; under
    `cfg.remat`), then `norm` and `head` (hidden -> backbone width)."""

    def __init__(self, cfg: PredictorConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.blocks = block_stack.make_blocks(
            cfg.num_layers, lambda r: PredictorBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
            stacked=cfg.scan_layers, rngs=rngs)
        self.norm = basic_layers.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, use_bias=True, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.head = basic_layers.linear(cfg.hidden_size, cfg.backbone_hidden_size, axes=("embed", "vocab"),
                                  init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, queries: Array, kv_tokens: Array, pos_q: Positions, pos_k: Positions,
                 mask: FrameCausalMask | Array | None = None) -> Array:
        """queries [B, Lq, hidden]; kv_tokens [B, Lk, backbone]; pos_q / pos_k: one [B, Lq] / [B, Lk] array
        per RoPE axis; mask: a FrameCausalMask, or boolean, True = attend, broadcastable to
        [B, heads, Lq, Lk] (None: all).
        Returns [B, Lq, backbone]."""
        if queries.ndim != 3 or queries.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"queries must be [B, Lq, {self.cfg.hidden_size}], got {queries.shape}")
        if kv_tokens.ndim != 3 or kv_tokens.shape[-1] != self.cfg.backbone_hidden_size:
            raise ValueError(f"kv_tokens must be [B, Lk, {self.cfg.backbone_hidden_size}], got {kv_tokens.shape}")
        for name, pos, length in (("pos_q", pos_q, queries.shape[1]), ("pos_k", pos_k, kv_tokens.shape[1])):
            if len(pos) != len(self.cfg.rope_axis_sizes):
                raise ValueError(f"{name} has {len(pos)} axes, the predictor's RoPE has "
                                 f"{len(self.cfg.rope_axis_sizes)}")
            if any(p.shape[-1] != length for p in pos):
                raise ValueError(f"{name} lengths {[p.shape for p in pos]} do not match {length} tokens")
        # The residual stream stays float32 under bf16 compute (as torch autocast's residual adds, and as
        # DeltaTok's blocks): norms and matmuls run in `dtype`, the sums do not round to bf16 per layer.
        x = queries.astype(jnp.float32)
        kv_tokens = kv_tokens.astype(self.dtype)
        rope_q = rope.axis_rope_tables(pos_q, self.cfg.rope_axis_sizes)  # once for all blocks
        rope_k = rope.axis_rope_tables(pos_k, self.cfg.rope_axis_sizes)
        # One scan over the stacked blocks; the key/value tokens, RoPE tables and mask go to every layer.
        x = block_stack.run_blocks(self.blocks, x, kv_tokens, rope_q, rope_k, mask, remat=self.cfg.remat)
        return self.head(self.norm(x))


# ----------------------------------------------------------------------------------------------------
# Query machinery shared by DeltaWorld and DINO-World
# ----------------------------------------------------------------------------------------------------


def noise_queries(rng: Array, shape: tuple[int, ...], hidden_size: int, init_std: float,
                  dtype=jnp.float32) -> Array:
    """N(0, 1) * init_std queries of shape [*shape, hidden_size] (official `_sample_queries`)."""
    return (jax.random.normal(rng, (*shape, hidden_size), jnp.float32) * init_std).astype(dtype)


def candidate_queries(rng: Array, candidate_ids: Array, shape: tuple[int, ...], hidden_size: int,
                      init_std: float) -> Array:
    """Noise queries of the best-of-K candidates `candidate_ids` ([C] ints): [*shape, C, hidden].

    Candidate k's noise depends only on (rng, k), never on how the K candidates are chunked, so a chunked
    search and a brute-force loop over k see the same candidates."""
    per_candidate = jax.vmap(lambda k: noise_queries(jax.random.fold_in(rng, k), shape, hidden_size, init_std))
    return jnp.moveaxis(per_candidate(candidate_ids), 0, len(shape))


def expand_candidate_positions(pos_q_bfp: Positions, num_candidates: int) -> Positions:
    """[B, F, P] query positions -> [B, F*C*P] in the (frame, candidate, token) order of the query layout."""
    return tuple(jnp.broadcast_to(p[:, :, None, :], (p.shape[0], p.shape[1], num_candidates, p.shape[2]))
                 .reshape(p.shape[0], -1) for p in pos_q_bfp)


def select_best_queries(
    predictor: Predictor,
    rng: Array,
    *,
    num_candidates: int,
    chunk_size: int | None,
    kv_tokens: Array,
    pos_q_bfp: Positions,
    pos_k: Positions,
    q_frames: Array,
    k_frames: Array,
    targets_bfpd: Array,
    loss_fn: Callable[[Array, Array], Array],
) -> tuple[Array, Array, Array]:
    """Best-of-K: the candidate noise query with the lowest loss, per (batch, frame to predict).

    The search runs on a copy of the predictor's parameters under stop_gradient, so nothing in it is kept
    for backprop; the K candidates go in chunks of `chunk_size` (None: all at once) through a lax.scan that
    carries only the running best, so the search's memory is one chunk's activations. Ties go to the lowest
    candidate index, as torch.argmin. Returns (queries [B, F, hidden], index [B, F], best loss [B, F])."""
    chunk = num_candidates if not chunk_size else min(chunk_size, num_candidates)
    if num_candidates % chunk:
        raise ValueError(f"num_candidates {num_candidates} is not a multiple of the chunk size {chunk}")
    graphdef, state = nnx.split(predictor)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    kv_tokens, targets_bfpd = jax.lax.stop_gradient((kv_tokens, targets_bfpd))
    b, f, p = targets_bfpd.shape[:3]
    hidden, std = predictor.cfg.hidden_size, predictor.cfg.init_std
    pos_q = expand_candidate_positions(pos_q_bfp, chunk)
    # numpy: the frame ids are trace-time constants, so the mask stays static (splash skips masked blocks)
    q_frame_ids = np.broadcast_to(np.asarray(q_frames)[:, None, None], (f, chunk, p)).reshape(-1)
    mask = frame_causal_mask(q_frame_ids, k_frames)

    def candidate_losses(candidates_bfcd: Array) -> Array:
        """Mean loss of every candidate query [B, F, C]: each is repeated over the P tokens of its frame
        (P = 1 for DeltaWorld, the patches for DINO-World), and all F*C*P queries go through the predictor
        in ONE pass (queries are independent), with the frame-causal mask of their frame."""
        queries = jnp.broadcast_to(candidates_bfcd[:, :, :, None, :], (b, f, chunk, p, hidden))
        preds = frozen(queries.reshape(b, f * chunk * p, hidden), kv_tokens, pos_q, pos_k, mask)
        return jnp.mean(loss_fn(preds.reshape(b, f, chunk, p, -1), targets_bfpd[:, :, None]), axis=(-2, -1))

    def scan_chunk(carry, first_id):
        best_loss, best_index, best_query = carry
        ids = first_id + jnp.arange(chunk)
        cands = candidate_queries(rng, ids, (b, f), hidden, std)  # [B, F, C, hidden]
        losses = candidate_losses(cands)
        chunk_best = jnp.argmin(losses, axis=-1)
        chunk_loss = jnp.take_along_axis(losses, chunk_best[..., None], -1)[..., 0]
        chunk_query = jnp.take_along_axis(cands, chunk_best[..., None, None], 2)[:, :, 0]
        better = chunk_loss < best_loss  # strict: an earlier chunk wins ties
        return (jnp.where(better, chunk_loss, best_loss), jnp.where(better, ids[chunk_best], best_index),
                jnp.where(better[..., None], chunk_query, best_query)), None

    init = (jnp.full((b, f), jnp.inf, jnp.float32), jnp.zeros((b, f), jnp.int32),
            jnp.zeros((b, f, hidden), jnp.float32))
    (best_loss, best_index, best_query), _ = jax.lax.scan(
        scan_chunk, init, jnp.arange(0, num_candidates, chunk))
    return jax.lax.stop_gradient(best_query), best_index, best_loss


def smooth_l1_loss_fn(beta: float) -> Callable[[Array, Array], Array]:
    """The world models' criterion: elementwise smooth-L1 (torch SmoothL1Loss, reduction none)."""
    return lambda pred, target: smooth_l1(pred, target, beta)
