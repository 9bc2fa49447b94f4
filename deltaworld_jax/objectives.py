"""Training objectives: log-cosh (DeltaTok), smooth-L1 (DeltaWorld, DINO-World), best-of-K selection
(of candidates in training, of sampled futures in evaluation).

All losses are elementwise (no reduction) and computed in float32, like the official criteria with
`reduction="none"`; callers average."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def log_cosh(pred: Array, target: Array) -> Array:
    """log(cosh(pred - target)), written stably as |d| + softplus(-2|d|) - log 2 (the official LogCoshLoss)."""
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return diff + jax.nn.softplus(-2.0 * diff) - math.log(2.0)


def smooth_l1(pred: Array, target: Array, beta: float = 0.1) -> Array:
    """torch.nn.SmoothL1Loss(reduction="none", beta=beta): 0.5 d^2 / beta where |d| < beta, else |d| - beta/2."""
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if beta == 0:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


LOSSES = {"log_cosh": log_cosh, "smooth_l1": smooth_l1, "mse": lambda p, t: jnp.square(p.astype(jnp.float32) - t.astype(jnp.float32))}


def best_of_k(losses: Array, candidates: Array) -> tuple[Array, Array]:
    """Pick, per position, the candidate with the lowest loss.

    losses: [..., K] (one scalar loss per candidate); candidates: [..., K, *rest].
    Returns (chosen [..., *rest], index [...]). Ties go to the lowest index, as torch.argmin."""
    index = jnp.argmin(losses, axis=-1)
    chosen = jnp.take_along_axis(
        candidates, index.reshape(index.shape + (1,) * (candidates.ndim - index.ndim)), axis=index.ndim
    )
    return jnp.squeeze(chosen, axis=index.ndim), index


def best_of_samples(rollouts_bshnd: Array, targets_bhnd: Array, criterion) -> tuple[Array, Array]:
    """The official best-of-N of sampled futures: per clip, the sample whose LAST predicted frame has the lowest
    mean elementwise `criterion` (pred, target) to the truth. Returns (best rollout [B, horizon, N, D], index [B])."""
    losses = jnp.mean(criterion(rollouts_bshnd[:, :, -1], targets_bhnd[:, None, -1]), axis=(-2, -1))  # [B, S]
    return best_of_k(losses, rollouts_bshnd)
