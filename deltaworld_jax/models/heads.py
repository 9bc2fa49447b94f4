"""Frozen task heads that read VFM patch features: segmentation and depth linear probes, and the RGB decoder.

Features are channels-last: [..., D] for the linear probes (any leading shape: [B, h, w, D] or [B, N, D]),
[B, h, w, D] or [B, N, D] + `grid_hw` for the RGB decoder. Outputs keep the leading shape:
  SegHead    logits [..., num_classes]
  DepthHead  depth in metres [...]          (the expectation over 256 depth bins)
  RGBHead    pixels [B, h*p, w*p, 3]         (un-normalised with the ImageNet mean/std, NOT clipped)

Submodule and variable names mirror the official PyTorch heads (`bn.running_mean`, `head`,
`decoder_layers.N.attention.attention.query`, ...) so importing released weights is a plain rename.
All heads compute in float32: they are small, frozen, and only used for evaluation and pictures.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.attention import dot_product_attention
from deltaworld_jax.models.basic_layers import LayerNorm, linear

Array = jax.Array

# ImageNet statistics: the VFM's input normalisation, which the RGB head undoes on its output.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# KITTI depth range of the official depth probe (datasets/kitti.py MIN_DEPTH / MAX_DEPTH).
KITTI_MIN_DEPTH = 1e-3
KITTI_MAX_DEPTH = 80.0

NUM_CLASSES = {"vspw": 124, "cityscapes": 19}


class BatchNormInference(nnx.Module):
    """BatchNorm2d over the channel (last) axis with its running statistics (eval mode, as the official
    frozen heads always run): (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.weight[...]
        return (x - self.running_mean[...]) * inv + self.bias[...]


def _check_features(x: Array, width: int, name: str) -> None:
    if x.shape[-1] != width:
        raise ValueError(f"{name} expects features with {width} channels on the last axis, got shape {x.shape}")


class SegHead(nnx.Module):
    """Segmentation linear probe: BatchNorm + 1x1 conv (a Linear over channels) -> class logits."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.in_features, self.num_classes = in_features, num_classes
        self.bn = BatchNormInference(in_features)
        self.head = nnx.Linear(in_features, num_classes, rngs=rngs)

    def __call__(self, features: Array) -> Array:
        _check_features(features, self.in_features, "SegHead")
        return self.head(self.bn(features))


class DepthHead(nnx.Module):
    """Depth probe: BatchNorm + 1x1 conv to `num_bins` logits; relu + 0.1, normalised over bins, and the
    expectation over bin centres linspace(min_depth, max_depth, num_bins)."""

    def __init__(self, in_features: int, *, min_depth: float = KITTI_MIN_DEPTH, max_depth: float = KITTI_MAX_DEPTH,
                 num_bins: int = 256, rngs: nnx.Rngs):
        self.in_features, self.num_bins = in_features, num_bins
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.bn = BatchNormInference(in_features)
        self.head = nnx.Linear(in_features, num_bins, rngs=rngs)

    def __call__(self, features: Array, eps: float = 0.1) -> Array:
        _check_features(features, self.in_features, "DepthHead")
        weights = jax.nn.relu(self.head(self.bn(features))) + eps
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        bins = jnp.linspace(self.min_depth, self.max_depth, self.num_bins, dtype=jnp.float32)
        return jnp.einsum("...k,k->...", weights, bins)


# ----------------------------------------------------------------------------------------------------
# RGB head: a ViT decoder (MAE/RAE style) from patch features to pixels
# ----------------------------------------------------------------------------------------------------


def sincos_pos_embed(hidden_size: int, grid_size: int) -> np.ndarray:
    """The official fixed position table [1, 1 + g*g, hidden] (row 0 for the CLS token is zero).

    Token k = i*g + j (row i, column j) gets [sin(i w), cos(i w), sin(j w), cos(j w)] with
    w = 1 / 10000**(arange(hidden/4) / (hidden/4)). (The official meshgrid uses 'xy' indexing and then
    stacks (x, y), which puts the ROW index first; we reproduce that order.)"""
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    coords = np.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(np.float32)  # [N, 2]
    angles = coords[:, :, None] * omega[None, None, :]  # [N, 2, quarter]
    table = np.concatenate([np.sin(angles), np.cos(angles)], -1).reshape(grid_size * grid_size, -1)
    return np.concatenate([np.zeros((1, table.shape[1])), table])[None].astype(np.float32)


def _cubic_weight(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution kernel with torch's a = -0.75."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's F.interpolate(mode='bicubic', align_corners=False) along one axis:
    half-pixel source positions, a = -0.75, taps clamped to the border, no antialiasing.

    jax.image.resize(method='cubic') differs (Keys a = -0.5, and antialiasing when shrinking), so the
    RGB head's position-table resize uses this matrix to match the official decoder."""
    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        frac = src - base
        for tap in range(-1, 3):
            idx = min(max(base + tap, 0), in_size - 1)
            matrix[i, idx] += _cubic_weight(np.array(tap - frac))
    return matrix.astype(np.float32)


class _QKV(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        kw = dict(axes=("embed", "heads"), rngs=rngs)
        self.query = linear(hidden_size, hidden_size, **kw)
        self.key = linear(hidden_size, hidden_size, **kw)
        self.value = linear(hidden_size, hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        b, l, d = x.shape
        split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
        out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                    implementation="reference")
        return out.reshape(b, l, d)


class _Dense(nnx.Module):
    """A holder named like the official `nn.ModuleDict({'dense': Linear})`."""

    def __init__(self, in_features: int, out_features: int, axes, *, rngs: nnx.Rngs):
        self.dense = linear(in_features, out_features, axes=axes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.dense(x)


class _Attention(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attention = _QKV(hidden_size, num_heads, rngs=rngs)
        self.output = _Dense(hidden_size, hidden_size, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.output(self.attention(x))


class RGBDecoderLayer(nnx.Module):
    """Pre-norm ViT layer (LayerNorm eps 1e-12, exact GELU), named like the official `_Block`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_size: int, *, rngs: nnx.Rngs):
        self.attention = _Attention(hidden_size, num_heads, rngs=rngs)
        self.layernorm_before = LayerNorm(hidden_size, eps=1e-12, rngs=rngs)
        self.layernorm_after = LayerNorm(hidden_size, eps=1e-12, rngs=rngs)
        self.intermediate = _Dense(hidden_size, mlp_size, ("embed", "mlp"), rngs=rngs)
        self.output = _Dense(mlp_size, hidden_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(jax.nn.gelu(self.intermediate(self.layernorm_after(x)), approximate=False))


class RGBHead(nnx.Module):
    """ViT decoder from VFM patch features to RGB pixels (the official RGBHead, adapted from RAE).

    The input is first mapped back through the VFM's final LayerNorm affine, (x - norm_bias) / norm_weight,
    then embedded, given a CLS token and the fixed sincos position table (bicubically resized as torch does
    when the patch grid differs from img_size/patch), decoded, and each token predicts patch*patch*3
    normalised pixels laid out (row, column, channel) inside its patch. The output is un-normalised with
    the ImageNet mean/std, so values are roughly in [0, 1] (not clipped).
    Released sizes: hidden 1152, depth 28, heads 16, mlp 4096, patch 16, img 512."""

    def __init__(self, in_features: int, norm_weight, norm_bias, *, hidden_size: int = 1152, depth: int = 28,
                 num_heads: int = 16, mlp_size: int = 4096, patch_size: int = 16, img_size: int = 512,
                 img_mean=IMAGENET_MEAN, img_std=IMAGENET_STD, rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (sincos position table)")
        norm_weight = jnp.asarray(norm_weight, jnp.float32).reshape(-1)
        norm_bias = jnp.asarray(norm_bias, jnp.float32).reshape(-1)
        if norm_weight.shape != (in_features,) or norm_bias.shape != (in_features,):
            raise ValueError(f"norm_weight/norm_bias must have shape ({in_features},), got "
                             f"{norm_weight.shape} and {norm_bias.shape}")
        self.in_features, self.patch_size, self.num_heads = in_features, patch_size, num_heads
        # The VFM's final-norm affine and the image statistics are fixed buffers, not loaded weights.
        self.norm_weight = nnx.Variable(norm_weight)
        self.norm_bias = nnx.Variable(norm_bias)
        self.img_mean = nnx.Variable(jnp.asarray(img_mean, jnp.float32))
        self.img_std = nnx.Variable(jnp.asarray(img_std, jnp.float32))
        self.decoder_embed = linear(in_features, hidden_size, axes=("vocab", "embed"), rngs=rngs)
        self.trainable_cls_token = nnx.Param(jnp.zeros((1, 1, hidden_size), jnp.float32))
        grid = img_size // patch_size
        # A fixed (non-trained) table, but part of the released checkpoint.
        self.decoder_pos_embed = nnx.Variable(jnp.asarray(sincos_pos_embed(hidden_size, grid)))
        self.decoder_layers = nnx.List(
            [RGBDecoderLayer(hidden_size, num_heads, mlp_size, rngs=rngs) for _ in range(depth)])
        self.decoder_norm = LayerNorm(hidden_size, eps=1e-12, rngs=rngs)
        self.decoder_pred = linear(hidden_size, patch_size * patch_size * 3, axes=("embed", "vocab"), rngs=rngs)

    def position_table(self, grid_hw: tuple[int, int]) -> Array:
        """[1, 1 + h*w, hidden]: the stored table, bicubically resized (torch semantics) to the grid."""
        table = self.decoder_pos_embed[...]
        stored = int(round((table.shape[1] - 1) ** 0.5))
        h, w = grid_hw
        if (stored, stored) == (h, w):
            return table
        patch_table = table[0, 1:].reshape(stored, stored, -1)
        rows = jnp.asarray(torch_bicubic_matrix(stored, h))
        cols = jnp.asarray(torch_bicubic_matrix(stored, w))
        resized = jnp.einsum("hy,yxc,wx->hwc", rows, patch_table, cols, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([table[:, :1], resized.reshape(1, h * w, -1)], axis=1)

    def __call__(self, features: Array, grid_hw: tuple[int, int] | None = None) -> Array:
        if features.ndim == 4:
            b, h, w, d = features.shape
            features = features.reshape(b, h * w, d)
        elif features.ndim == 3:
            b, n, d = features.shape
            if grid_hw is None:
                side = int(round(n ** 0.5))
                if side * side != n:
                    raise ValueError(f"RGBHead got {n} tokens, not a square grid: pass grid_hw=(h, w)")
                grid_hw = (side, side)
            h, w = grid_hw
            if h * w != n:
                raise ValueError(f"grid_hw {grid_hw} does not match {n} tokens")
        else:
            raise ValueError(f"RGBHead expects [B, h, w, D] or [B, N, D] features, got shape {features.shape}")
        _check_features(features, self.in_features, "RGBHead")
        x = (features.astype(jnp.float32) - self.norm_bias[...]) / self.norm_weight[...]
        x = self.decoder_embed(x)
        cls = jnp.broadcast_to(self.trainable_cls_token[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_table((h, w))
        for layer in self.decoder_layers:
            x = layer(x)
        pixels = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p = self.patch_size
        pixels = pixels.reshape(b, h, w, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3)
        return pixels * self.img_std[...] + self.img_mean[...]


def on_patch_grid(head: nnx.Module, feats_bnd: Array, grid_hw: tuple[int, int]) -> Array:
    """Any head on patch features [B, N, D] laid out as the patch grid [B, h, w, D] (the one layout every
    head reads): seg logits [B, h, w, C], depth [B, h, w], RGB pixels [B, h*p, w*p, 3]."""
    h, w = grid_hw
    if feats_bnd.shape[-2] != h * w:
        raise ValueError(f"features {feats_bnd.shape} do not hold the {h} x {w} patches of grid {grid_hw}")
    return head(feats_bnd.reshape(-1, h, w, feats_bnd.shape[-1]))
