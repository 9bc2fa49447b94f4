"""Rotary position embeddings: DINOv3's 2-D RoPE over the patch grid (`rope_2d`, `apply_rope_2d`; prefix
tokens pass unrotated, optional train-time coordinate augmentation) and the predictor's multi-axis RoPE
(1-D over time for DeltaWorld, 3-D (t, x, y) for DINO-World: `axis_rope_tables`, `apply_axis_rope`).

The cos/sin tables are computed once per model call, not per layer: un-augmented 2-D tables are numpy
constants (they depend on shapes only), augmented and axis tables are materialised behind an optimisation
barrier. Left to XLA, the cos/sin would be recomputed inside the fused RoPE kernel of every layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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
