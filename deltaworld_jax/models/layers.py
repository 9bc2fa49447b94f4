"""Shared transformer pieces: RoPE (2-D patch grid, 1-D/3-D over time), attention, MLPs, LayerScale, the
two layouts of a stack of identical blocks (`make_blocks`: per-layer modules, or one `BlockStack` whose
parameters are stored stacked on a leading layer axis), and `run_blocks`, which runs the first unrolled and
the second as one scan (either optionally rematerialised).

Layout conventions: tokens are [batch, length, hidden]; attention heads are [batch, length, heads, head_dim]
(the layout `jax.nn.dot_product_attention` takes). `dtype` is the compute dtype, `param_dtype` the storage
dtype of parameters; norms, softmax and RoPE angles are computed in float32.

Parameters carry logical axis names (see `deltaworld_jax/sharding.py` for the mapping to mesh axes):
  embed: the model width          mlp: the MLP width          heads: the flattened heads x head_dim
  vocab: per-head / output-size axes that are never sharded     norm: small vectors (scales, biases)
  layers: the leading layer axis of a BlockStack's parameters (LAYER_AXIS; the mesh rules map it to none)
Submodule names follow the official PyTorch/`transformers` names so weight import is a plain rename.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax import sharding as sharding_lib
from deltaworld_jax.models import attention

Array = jax.Array

# ----------------------------------------------------------------------------------------------------
# Initialisers and basic layers
# ----------------------------------------------------------------------------------------------------


def trunc_normal(std: float) -> nnx.Initializer:
    """Truncated normal at +-2 std, as `torch.nn.init.trunc_normal_(std=...)` (cut at +-2 absolute, which
    equals +-2 std only for std=1; for std=0.02 torch's cut is effectively no cut, so we use a plain
    truncation at 2 std, the statistically sensible reading that every JAX port uses)."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    use_bias: bool = True,
    init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """nnx.Linear with truncated-normal weights, zero bias and logical axis names on both."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(trunc_normal(init_std), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32; returns `dtype` (the compute dtype). `use_bias=False` gives the
    bias-free norm DeltaTok's QK-norm uses."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=("norm",))
        self.bias = (
            nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=("norm",))
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        y = layer_norm_f32(x.astype(jnp.float32), self.weight[...].astype(jnp.float32), bias, self.eps)
        return y.astype(self.dtype)


def _normalise(x: Array, eps: float) -> tuple[Array, Array]:
    """(x - mean) / sqrt(var + eps) over the last axis, and 1 / sqrt(var + eps); float32."""
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_f32(x: Array, weight: Array, bias: Array | None, eps: float) -> Array:
    """LayerNorm over the last axis, all float32, with its gradient written out by hand.

    Why a hand-written gradient: autodiff of the two-pass forward (mean, then the variance of x - mean) gives
    XLA:CPU a graph it runs 4-5x slower than the textbook form below (forward + backward of 8 stacked norms on
    [16, 129, 192]: 19.5-20.8 ms vs 4.0-4.7 ms); the values agree to float32 rounding (2e-7 relative). The forward
    is the same expression as before, so outputs are unchanged."""
    return _layer_norm_fwd(x, weight, bias, eps)[0]


def _layer_norm_fwd(x, weight, bias, eps):
    normed, inv_std = _normalise(x, eps)
    y = normed * weight
    return (y if bias is None else y + bias), (normed, inv_std, weight, bias is None)


def _layer_norm_bwd(eps, residuals, dy):
    del eps
    normed, inv_std, weight, no_bias = residuals
    g = dy * weight
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True)
                    - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    leading = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * normed, axis=leading), None if no_bias else jnp.sum(dy, axis=leading)


layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerScale(nnx.Module):
    """Per-channel residual scale (`lambda1` in DINOv3), initialised to `init_value`: the parameter only (its
    module path is the official checkpoints' name). The blocks apply it folded into their branch's last
    projection (`scaled_linear`): the same function as branch(x) * lambda1, with a cheaper gradient."""

    def __init__(self, dim: int, *, init_value: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs
        self.lambda1 = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))


def scaled_linear(layer: nnx.Linear, x: Array, scale: Array | None) -> Array:
    """layer(x) * scale for a per-output-channel `scale` (LayerScale after a block's last projection), with
    the scale folded into the weights: x @ (W * scale) + b * scale.

    Why: written as (x @ W + b) * scale, the gradient of `scale` is an activation-sized product and reduction
    (sum over every token of (x @ W + b) * dy, with x @ W + b kept or recomputed for it), one per LayerScale
    per layer; folded, it is weight-sized (sum over W's rows of W * dW_folded), and the backward pass has no
    activation-sized work beyond the matmuls'. The forward differs from the unfolded one by rounding only
    (float32: ~1 ulp of the branch's update). The result is promoted as the unfolded product is (a bf16 compute
    dtype with a float32 scale gives float32, as torch's autocast does), so the update added to a float32
    residual stream is not left in bf16."""
    if scale is None:
        return layer(x)
    kernel = layer.kernel[...] * scale
    bias = layer.bias[...] * scale if layer.bias is not None else None
    x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    if bias is not None:
        y = y + bias
    return y.astype(jnp.promote_types(y.dtype, scale.dtype))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # torch's nn.GELU / transformers "gelu" is the exact (erf) GELU, not the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """up_proj -> activation -> down_proj (DINOv3ViTMLP); `gated`: down_proj(act(gate_proj(x)) * up_proj(x))
    (SwiGLU, DINOv3ViTGatedMLP)."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "gelu", gated: bool = False,
                 use_bias: bool = True, init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.gated = gated
        if gated:  # first: the official module's order of initialisation
            self.gate_proj = linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x: Array, out_scale: Array | None = None) -> Array:
        """`out_scale`: a LayerScale's lambda, folded into down_proj (scaled_linear)."""
        if self.gated:
            hidden = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = ACTIVATIONS[self.act](self.up_proj(x))
        return scaled_linear(self.down_proj, hidden, out_scale)


class GatedMLP(MLP):
    """The SwiGLU MLP (DINOv3ViTGatedMLP): MLP(gated=True), SiLU by default."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "silu", **kwargs):
        super().__init__(hidden, intermediate, act=act, gated=True, **kwargs)


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------


def patch_center_coords(grid_h: int, grid_w: int) -> Array:
    """(y, x) centres of a grid of patches in [-1, 1]: [grid_h * grid_w, 2], row-major like the patches."""
    ys = (jnp.arange(grid_h, dtype=jnp.float32) + 0.5) / grid_h
    xs = (jnp.arange(grid_w, dtype=jnp.float32) + 0.5) / grid_w
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    return 2.0 * jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1) - 1.0


@dataclasses.dataclass(frozen=True)
class RopeAugmentation:
    """DINOv3's train-time coordinate augmentation. `None` disables a term.

    shift: add U(-shift, shift) per axis; jitter: multiply by a log-uniform factor in [1/jitter, jitter]
    per axis; rescale: multiply both axes by ONE log-uniform factor in [1/rescale, rescale]."""

    shift: float | None = None
    jitter: float | None = None
    rescale: float | None = 2.0

    def __call__(self, coords: Array, rng: Array) -> Array:
        k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
        if self.shift is not None:
            coords = coords + jax.random.uniform(k_shift, (1, 2), minval=-self.shift, maxval=self.shift)
        if self.jitter is not None:
            r = math.log(self.jitter)
            coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), minval=-r, maxval=r))
        if self.rescale is not None:
            r = math.log(self.rescale)
            coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), minval=-r, maxval=r))
        return coords


def rope_2d(
    grid_hw: tuple[int, int],
    head_dim: int,
    *,
    theta: float = 100.0,
    augmentation: RopeAugmentation | None = None,
    rng: Array | None = None,
) -> tuple[Array, Array]:
    """DINOv3 2-D RoPE tables (cos, sin), each [grid_h * grid_w, head_dim], float32.

    head_dim/4 frequencies per axis; angles 2*pi*coord*inv_freq laid out [y-freqs, x-freqs] tiled twice,
    for the rotate-half convention. Augmentation applies only when both `augmentation` and `rng` are given
    (inference mode passes no rng).

    Speed: without augmentation the tables depend on shapes only, so they are numpy constants folded in at
    trace time (XLA otherwise recomputes cos/sin inside every fused RoPE kernel of every layer). The
    augmented tables are computed once and materialised (an optimisation barrier) for the same reason."""
    if augmentation is None or rng is None:
        return _static_rope_2d(tuple(grid_hw), head_dim, float(theta))
    coords = augmentation(patch_center_coords(*grid_hw), rng)
    inv_freq = 1.0 / theta ** jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32)  # [head_dim/4]
    angles = 2 * jnp.pi * coords[:, :, None] * inv_freq[None, None, :]  # [N, 2, head_dim/4]
    angles = jnp.tile(angles.reshape(coords.shape[0], -1), (1, 2))  # [N, head_dim]
    return jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


def _static_rope_2d(grid_hw: tuple[int, int], head_dim: int, theta: float) -> tuple[Array, Array]:
    """The un-augmented tables in numpy: the same float32 angles as the traced path, cos/sin correctly
    rounded (evaluated in float64)."""
    gh, gw = grid_hw
    ys = (np.arange(gh, dtype=np.float32) + np.float32(0.5)) / np.float32(gh)
    xs = (np.arange(gw, dtype=np.float32) + np.float32(0.5)) / np.float32(gw)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.float32(2.0) * np.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1) - np.float32(1.0)
    inv_freq = (np.float32(1.0) / np.float32(theta) ** np.arange(0, 1, 4 / head_dim, dtype=np.float32))
    angles = np.float32(2 * np.pi) * coords[:, :, None] * inv_freq[None, None, :].astype(np.float32)
    angles = np.tile(angles.reshape(coords.shape[0], -1), (1, 2)).astype(np.float64)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope_2d(x_blhd: Array, cos: Array, sin: Array) -> Array:
    """Rotate the LAST cos.shape[0] tokens of x [B, L, H, hd]; earlier (prefix) tokens pass unrotated,
    as in `transformers`' DINOv3 `apply_rotary_pos_emb`. cos/sin: [N, hd] or [B, N, hd]."""
    num_patches = cos.shape[-2]
    num_prefix = x_blhd.shape[1] - num_patches
    prefix, patches = x_blhd[:, :num_prefix], x_blhd[:, num_prefix:]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    p32 = patches.astype(jnp.float32)
    rotated = (p32 * cos + rotate_half(p32) * sin).astype(x_blhd.dtype)
    return jnp.concatenate([prefix, rotated], axis=1)


def axis_rope_inv_freq(half: int) -> Array:
    """1 / 10**linspace(-2, 2, half): the predictor's frequencies (periods from 0.01 to 100 position units)."""
    return 1.0 / (10.0 ** jnp.linspace(-2.0, 2.0, half, dtype=jnp.float32))


AxisRopeTables = tuple[tuple[Array, Array], ...]  # per axis (cos, sin), each [B, L, 1, size // 2] float32


def axis_rope_tables(positions: tuple[Array, ...], axis_sizes: tuple[int, ...]) -> AxisRopeTables:
    """cos/sin of the predictor's RoPE angles (2*pi*pos*inv_freq) per axis, from one [B, L] position array
    per axis. Computed ONCE per predictor call and materialised (an optimisation barrier): left to XLA, the
    cos/sin are recomputed inside the fused RoPE kernel of every layer, for q and k."""
    if len(positions) != len(axis_sizes):
        raise ValueError(f"{len(positions)} position arrays for {len(axis_sizes)} RoPE axes")
    tables = []
    for pos, size in zip(positions, axis_sizes):
        angle = 2 * jnp.pi * pos.astype(jnp.float32)[:, :, None, None] * axis_rope_inv_freq(size // 2)
        tables.append((jnp.cos(angle), jnp.sin(angle)))
    return jax.lax.optimization_barrier(tuple(tables))


def apply_axis_rope(
    x_blhd: Array,
    positions: tuple[Array, ...] | None,
    axis_sizes: tuple[int, ...],
    unrotated_size: int,
    tables: AxisRopeTables | None = None,
) -> Array:
    """The predictor's multi-axis RoPE (1-D over time for DeltaWorld, 3-D (t, x, y) for DINO-World).

    x: [B, L, H, hd]; positions: one [B, L] array per axis (or `tables` from axis_rope_tables). Per head,
    consecutive chunks of `axis_sizes` dims are rotated by their axis' positions (rotate-half within the
    chunk, angle 2*pi*pos*inv_freq), then `unrotated_size` dims pass through. Anything beyond is dropped,
    exactly as the official code."""
    if tables is None:
        tables = axis_rope_tables(positions, axis_sizes)
    if len(tables) != len(axis_sizes):
        raise ValueError(f"{len(tables)} RoPE tables for {len(axis_sizes)} RoPE axes")
    x32 = x_blhd.astype(jnp.float32)
    parts, offset = [], 0
    for (cos, sin), size in zip(tables, axis_sizes):
        half = size // 2
        even = x32[..., offset : offset + half]
        odd = x32[..., offset + half : offset + 2 * half]
        parts += [even * cos - odd * sin, even * sin + odd * cos]
        offset += size
    parts.append(x32[..., offset : offset + unrotated_size])
    return jnp.concatenate(parts, axis=-1).astype(x_blhd.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


# dot_product_attention(q, k, v, mask=, implementation=) lives in models/attention.py (one kernel per backend
# behind the `implementation` option); re-exported here, where the attention modules use it.
dot_product_attention = attention.dot_product_attention


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
        out = dot_product_attention(q, k, v, mask=mask,
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
        out = dot_product_attention(q, k, v, mask=mask, implementation=implementation or self.implementation)
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


# ----------------------------------------------------------------------------------------------------
# Stacks of identical blocks: per-layer (unrolled) or stored stacked (one scan); optional remat
# ----------------------------------------------------------------------------------------------------

# Rematerialisation policies of a scanned block stack (a model option: `remat` of the model configs).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input, recompute the block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise work
    # keep only the weight matmuls (no batch dims); recompute attention's QK^T / AV and elementwise work
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# "auto", the default of the model configs' `remat`: SCANNED_REMAT for a scanned stack (a BlockStack of two
# blocks or more), "none" for per-layer (unrolled) blocks. Why not "none" everywhere: a scanned stack cannot
# lean on XLA's own rematerialisation, which on the unrolled stack recomputed the cheap, large activations
# (attention logits/probabilities, float32 copies) to fit HBM; unrolled blocks still can. Measured on
# DeltaTok ViT-B (12 + 12 blocks, 513 tokens, batch 8, bf16): the scan keeps 7.97 GiB of residuals with
# "none", 1.95 GiB with SCANNED_REMAT (weight matmul outputs kept; attention's QK^T / AV and the
# elementwise work recomputed, ~4% more FLOPs), 0.85 with "full".
DEFAULT_REMAT = "auto"
SCANNED_REMAT = "dots_with_no_batch_dims_saveable"


def check_remat(name: str | None) -> str:
    """The remat policy name (None / "" mean "none"; "auto" see DEFAULT_REMAT), with a clear error for an
    unknown one."""
    name = name or "none"
    if name != "auto" and name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)} and 'auto'")
    return name


# Logical axis name of the leading (layer) axis of a BlockStack's parameters. The mesh rules
# (configs/common.py) map it to no mesh axis: each device holds its shard of every layer, and the scan
# slices layer i of that shard.
LAYER_AXIS = "layers"
# The attribute of a BlockStack holding the stacked block: parameter paths read
# `encoder_blocks.stacked.mlp.up_proj.kernel` ([L, in, out]) where the per-layer layout has
# `encoder_blocks.3.mlp.up_proj.kernel` ([in, out]); pretrained/common.py converts between the two.
STACKED = "stacked"


class BlockStack(nnx.Module):
    """`num_layers` identical blocks stored as ONE block whose every parameter has a leading layer axis
    (logical name LAYER_AXIS): [L, in, out] kernels, [L, d] norms. Built with nnx.vmap over the block's
    constructor (each layer its own random init, from split rngs), run by `run_blocks` with nnx.scan.

    Why: a train step's program is mostly per-parameter-leaf work (AdamW, clipping, gradient norms,
    shardings; ~76 StableHLO ops per leaf, benchmarks/RESULTS.md), so a stack of L blocks of n leaves
    costs L * n leaves per-layer, n stacked, and compiles that much faster. The per-layer layout
    (`nnx.List` of blocks, the official checkpoints' names) stays the models' default; see make_blocks."""

    def __init__(self, num_layers: int, make_block: Callable[[nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"a BlockStack needs at least one layer, got {num_layers}")
        self.num_layers = int(num_layers)

        @nnx.split_rngs(splits=self.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=self.num_layers,
                  transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        def make(rngs):
            return make_block(rngs)

        setattr(self, STACKED, make(rngs))

    def __len__(self) -> int:
        return self.num_layers


def make_blocks(num_layers: int, make_block: Callable[[nnx.Rngs], nnx.Module], *, stacked: bool,
                rngs: nnx.Rngs) -> nnx.List | BlockStack:
    """A stack of `num_layers` identical blocks, `make_block(rngs)` each: per-layer modules (an nnx.List;
    parameter paths `blocks.3.mlp...` as in the official checkpoints; the models' default) or, with
    `stacked`, one BlockStack (`blocks.stacked.mlp...`, [L, ...]; the recipe configs' choice, for short
    compiles). run_blocks runs the first unrolled, the second as one scan; both compute the same
    function, and weight import fills either (pretrained/common.py)."""
    if stacked:
        return BlockStack(num_layers, make_block, rngs=rngs)
    return nnx.List([make_block(rngs) for _ in range(num_layers)])


def run_blocks(blocks: nnx.List | BlockStack, hidden: Array, *broadcast, remat: str = "none", **static) -> Array:
    """hidden -> blocks[-1](... blocks[0](hidden, *broadcast) ...), for either layout of make_blocks.

    A BlockStack runs as ONE `nnx.scan` over its stacked parameters: the block is traced and compiled
    once, not once per layer (the recipe's layout: short compiles). Per-layer blocks (an nnx.List) run one
    after the other, unrolled: no copy of their parameters into a stack (and of the gradients back) in
    every step, and XLA schedules and fuses across layers (the fastest for small models and on CPU; the
    models' default). `broadcast` arguments (RoPE tables, masks, key/value tokens) go unchanged to every
    layer. `static` keyword arguments (strings) are closed over. `remat` (REMAT_POLICIES, or "auto": see
    DEFAULT_REMAT) puts each block under `nnx.remat`."""
    remat = check_remat(remat)
    stacked = isinstance(blocks, BlockStack)
    if remat == "auto":
        remat = SCANNED_REMAT if stacked and len(blocks) > 1 else "none"

    def layer(x, block, *consts):
        # The carry stays split by batch over the mesh in context (see sharding.constrain_batch).
        return sharding_lib.constrain_batch(block(x, *consts, **static))

    if remat != "none":
        # prevent_cse=False inside a scan: XLA cannot merge the recompute into the forward pass anyway;
        # unrolled blocks keep jax's default.
        layer = nnx.remat(layer, policy=REMAT_POLICIES[remat], prevent_cse=not stacked)
    hidden = sharding_lib.constrain_batch(hidden)
    # The transforms run on fresh modules made here, never on the blocks themselves: those may belong to
    # an outer trace (a predictor merged outside the best-of-K lax.scan), and nnx.remat / nnx.scan write
    # their state back into the modules they are given.
    if stacked:
        # transform_metadata: inside the scan a layer's Variables carry their per-layer logical axes.
        run = nnx.scan(layer, in_axes=(nnx.Carry, 0) + (None,) * len(broadcast), out_axes=nnx.Carry,
                       transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        return run(hidden, _fresh(getattr(blocks, STACKED)), *broadcast)
    for block in blocks:
        hidden = layer(hidden, _fresh(block), *broadcast)
    return hidden


def _fresh(module: nnx.Module) -> nnx.Module:
    """`module` rebuilt with new Variables (the same values) in the current trace."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def count_params(module: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves) in a module, abstract or concrete."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
