"""Attention modules and the DINOv3-style transformer block: `SelfAttention` (DINOv3's, with DeltaTok's
optional QK-norm and per-head output gate), `CrossAttention` (the predictor's) and `Block` (DINOv3 itself,
and DeltaTok's encoder/decoder). The attention kernel is `attention.dot_product_attention` (one per backend
behind the `implementation` option); stacks of blocks are built and run by models/block_stack.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax.models import attention
from deltaworld_jax.models.basic_layers import MLP, LayerNorm, LayerScale, linear, scaled_linear
from deltaworld_jax.models.rope import AxisRopeTables, apply_axis_rope, apply_rope_2d

Array = jax.Array

# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    hidden_size: int
    num_heads: int
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    qk_norm: bool = False  # LayerNorm over head_dim without bias, AFTER RoPE (DeltaTok)
    output_gate: bool = False  # per-head sigmoid gate from the block's normed input (DeltaTok)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    implementation: str | None = "xla"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class SelfAttention(nnx.Module):
    """DINOv3 self-attention with DeltaTok's optional QK-norm (after RoPE) and per-head output gate."""

    def __init__(self, cfg: AttentionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        d = cfg.hidden_size
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, d, axes=("embed", "heads"), use_bias=cfg.query_bias, **kw)
        self.k_proj = linear(d, d, axes=("embed", "heads"), use_bias=cfg.key_bias, **kw)
        self.v_proj = linear(d, d, axes=("embed", "heads"), use_bias=cfg.value_bias, **kw)
        self.o_proj = linear(d, d, axes=("heads", "embed"), use_bias=cfg.proj_bias, **kw)
        if cfg.qk_norm:
            nkw = dict(eps=cfg.norm_eps, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.q_norm = LayerNorm(cfg.head_dim, **nkw)
            self.k_norm = LayerNorm(cfg.head_dim, **nkw)
        if cfg.output_gate:
            self.attn_gate = linear(d, cfg.num_heads, axes=("embed", "vocab"), use_bias=True, **kw)

    def __call__(self, x: Array, rope: tuple[Array, Array] | None = None, mask: Array | None = None,
                 implementation: str | None = None, out_scale: Array | None = None) -> Array:
        """`out_scale`: a LayerScale's lambda, folded into o_proj (scaled_linear)."""
        b, l, _ = x.shape
        h, hd = self.cfg.num_heads, self.cfg.head_dim
        q = self.q_proj(x).reshape(b, l, h, hd)
        k = self.k_proj(x).reshape(b, l, h, hd)
        v = self.v_proj(x).reshape(b, l, h, hd)
        if rope is not None:
            q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention.dot_product_attention(q, k, v, mask=mask,
                                              implementation=implementation or self.cfg.implementation)
        if self.cfg.output_gate:
            gate = jax.nn.sigmoid(self.attn_gate(x).astype(jnp.float32))  # [B, L, H]
            out = (out.astype(jnp.float32) * gate[..., None]).astype(out.dtype)
        return scaled_linear(self.o_proj, out.reshape(b, l, h * hd), out_scale)


class CrossAttention(nnx.Module):
    """The predictor's cross-attention: queries attend only to key/value tokens.

    q_proj on the (normed) queries; ONE fused kv_proj (kv_dim -> 2*hidden) on the raw key/value tokens,
    split into k then v; RoPE over `positions` on q and k (axis RoPE); out_proj."""

    def __init__(self, hidden_size: int, kv_size: int, num_heads: int, *, rope_axis_sizes: tuple[int, ...],
                 rope_unrotated_size: int, init_std: float = 0.02, implementation: str | None = "xla",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = hidden_size // num_heads
        if sum(rope_axis_sizes) + rope_unrotated_size != head_dim:
            raise ValueError(
                f"RoPE sizes must sum to head_dim: {rope_axis_sizes} + {rope_unrotated_size} != {head_dim}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rope_axis_sizes = tuple(rope_axis_sizes)
        self.rope_unrotated_size = rope_unrotated_size
        self.implementation = implementation
        kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(hidden_size, hidden_size, axes=("embed", "heads"), **kw)
        self.kv_proj = linear(kv_size, 2 * hidden_size, axes=("embed", "heads"), **kw)
        self.out_proj = linear(hidden_size, hidden_size, axes=("heads", "embed"), **kw)

    def __call__(self, queries: Array, kv_tokens: Array, rope_q: AxisRopeTables, rope_k: AxisRopeTables,
                 mask: Array | None = None, implementation: str | None = None,
                 out_scale: Array | None = None) -> Array:
        """rope_q / rope_k: axis_rope_tables of the query / key positions (computed once per predictor call);
        `out_scale`: a LayerScale's lambda, folded into out_proj (scaled_linear)."""
        b, lq, _ = queries.shape
        lk = kv_tokens.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(queries).reshape(b, lq, h, hd)
        kv = self.kv_proj(kv_tokens)
        k = kv[..., : self.hidden_size].reshape(b, lk, h, hd)
        v = kv[..., self.hidden_size :].reshape(b, lk, h, hd)
        q = apply_axis_rope(q, None, self.rope_axis_sizes, self.rope_unrotated_size, tables=rope_q)
        k = apply_axis_rope(k, None, self.rope_axis_sizes, self.rope_unrotated_size, tables=rope_k)
        out = attention.dot_product_attention(q, k, v, mask=mask,
                                              implementation=implementation or self.implementation)
        return scaled_linear(self.out_proj, out.reshape(b, lq, h * hd), out_scale)


# ----------------------------------------------------------------------------------------------------
# The DINOv3-style block (DINOv3 itself, and DeltaTok's encoder/decoder)
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    intermediate_size: int
    gated_mlp: bool = False  # SwiGLU
    act: str = "gelu"
    mlp_bias: bool = True
    layer_scale_init: float = 1.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


class Block(nnx.Module):
    """x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))) (transformers' DINOv3ViTLayer), each LayerScale
    folded into its branch's last projection (scaled_linear)."""

    def __init__(self, cfg: BlockConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.attention.hidden_size
        nkw = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(d, **nkw)
        self.attention = SelfAttention(cfg.attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale1 = LayerScale(d, init_value=cfg.layer_scale_init, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, **nkw)
        self.mlp = MLP(d, cfg.intermediate_size, act=cfg.act, gated=cfg.gated_mlp, use_bias=cfg.mlp_bias,
                       init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale2 = LayerScale(d, init_value=cfg.layer_scale_init, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, rope: tuple[Array, Array] | None = None, mask: Array | None = None,
                 implementation: str | None = None) -> Array:
        x = x + self.attention(self.norm1(x), rope, mask, implementation,
                               out_scale=self.layer_scale1.lambda1[...])
        return x + self.mlp(self.norm2(x), out_scale=self.layer_scale2.lambda1[...])
