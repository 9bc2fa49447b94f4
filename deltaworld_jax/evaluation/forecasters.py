"""Forecasters: one small interface for every model of the evaluation (and the copy-last lower bound).

A forecaster maps the VFM features of a clip to rollouts [B, S, horizon, N, D] (S samples) plus the targets
and context; `select_samples` turns S samples into the official 'mean' and 'best' (lowest criterion of the
LAST predicted frame) selections. The protocol that scores them is in evaluation.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax.objectives import best_of_k, log_cosh, smooth_l1

Array = jax.Array




class ClipFeatures(NamedTuple):
    feats: Array  # [B, T, N, D] VFM features of the whole clip
    timestamps: Array  # [B, T]
    grid_hw: tuple[int, int]
    black: Array  # [1, N, D] VFM features of an all-black frame of this size


class Forecast(NamedTuple):
    rollouts: Array  # [B, S, horizon, N, D]
    targets: Array  # [B, horizon, N, D]
    context: Array  # [B, c, N, D] the features before the predicted frames (for pictures)
    ctx_len: int  # the context length the model used (the result key c{ctx_len}_h{horizon})


class Forecaster(Protocol):
    name: str
    criterion: Callable[[Array, Array], Array]  # elementwise loss (pred, target)

    def __call__(self, clip: ClipFeatures, *, ctx_len: int, horizon: int, rng: Array) -> Forecast: ...


def world_criterion(pred: Array, target: Array) -> Array:
    return smooth_l1(pred, target, 0.1)


def _window(clip: ClipFeatures, ctx_len: int, horizon: int):
    t = clip.feats.shape[1]
    if ctx_len < 1 or ctx_len + horizon > t:
        raise ValueError(f"context {ctx_len} + horizon {horizon} does not fit a clip of {t} frames")
    start = t - ctx_len - horizon
    return clip.feats[:, start:], clip.timestamps[:, start:]


@dataclasses.dataclass
class CopyLast:
    """Lower bound: every future frame is the last context frame's features."""

    name: str = "copy_last"
    criterion: Callable = world_criterion

    def __call__(self, clip: ClipFeatures, *, ctx_len: int, horizon: int, rng: Array) -> Forecast:
        feats, _ = _window(clip, ctx_len, horizon)
        context = feats[:, :ctx_len]
        rollouts = jnp.broadcast_to(context[:, None, -1:], (feats.shape[0], 1, horizon, *feats.shape[2:]))
        return Forecast(rollouts, feats[:, ctx_len:], context, ctx_len)


@partial(nnx.jit, static_argnames=("horizon", "grid_hw"))
def jit_deltatok_rollout(tokenizer, feats, black, *, horizon, grid_hw):
    return tokenizer.rollout(feats, black, horizon, tokenizer.rope(grid_hw, rng=None))


@dataclasses.dataclass
class DeltaTokReconstruction:
    """DeltaTok's reconstruction rollout over the last `horizon` frames of the whole clip (ctx_len is
    ignored: the official DeltaTok evaluation starts from the one frame before the horizon)."""

    tokenizer: Any
    name: str = "deltatok"
    criterion: Callable = log_cosh
    uses_context = False

    def __call__(self, clip: ClipFeatures, *, ctx_len: int | None, horizon: int, rng: Array) -> Forecast:
        t = clip.feats.shape[1]
        preds, targets = jit_deltatok_rollout(self.tokenizer, clip.feats, clip.black, horizon=horizon,
                                           grid_hw=tuple(clip.grid_hw))
        return Forecast(preds[:, None], targets, clip.feats[:, :t - horizon], 0 if horizon >= t else 1)


@partial(nnx.jit, static_argnames=("ctx_len", "grid_hw", "num_samples"))
def jit_deltaworld_rollout(world, tokenizer, feats, times, black, rng, *, ctx_len, grid_hw, num_samples):
    return world.rollout(tokenizer, feats, times, grid_hw=grid_hw, ctx_len=ctx_len, rng=rng,
                         num_samples=num_samples, black_bnd=black)


@dataclasses.dataclass
class DeltaWorldForecaster:
    """DeltaWorld: N sampled futures per clip, decoded by the frozen DeltaTok."""

    world: Any
    tokenizer: Any
    num_samples: int = 20
    name: str = "deltaworld"
    criterion: Callable = world_criterion

    def __call__(self, clip: ClipFeatures, *, ctx_len: int, horizon: int, rng: Array) -> Forecast:
        feats, times = _window(clip, ctx_len, horizon)
        rollouts, targets = jit_deltaworld_rollout(self.world, self.tokenizer, feats, times, clip.black, rng,
                                                ctx_len=ctx_len, grid_hw=tuple(clip.grid_hw),
                                                num_samples=self.num_samples)
        return Forecast(rollouts, targets, feats[:, :ctx_len], ctx_len)


@partial(nnx.jit, static_argnames=("ctx_len", "grid_hw", "num_samples"))
def jit_dinoworld_rollout(world, feats, times, rng, *, ctx_len, grid_hw, num_samples):
    return world.rollout(feats, times, grid_hw=grid_hw, ctx_len=ctx_len, rng=rng, num_samples=num_samples)


@dataclasses.dataclass
class DINOWorldForecaster:
    """DINO-World: deterministic (one sample) unless trained best-of-K."""

    world: Any
    num_samples: int | None = None
    name: str = "dinoworld"
    criterion: Callable = world_criterion

    def __call__(self, clip: ClipFeatures, *, ctx_len: int, horizon: int, rng: Array) -> Forecast:
        feats, times = _window(clip, ctx_len, horizon)
        rollouts, targets = jit_dinoworld_rollout(self.world, feats, times, rng, ctx_len=ctx_len,
                                               grid_hw=tuple(clip.grid_hw), num_samples=self.num_samples)
        return Forecast(rollouts, targets, feats[:, :ctx_len], ctx_len)


def select_samples(forecast: Forecast, criterion: Callable) -> dict[str, tuple[Array, Array | None]]:
    """{'mean': (features [B, h, N, D], None), 'best': (features, index [B])} ('best' only when S > 1)."""
    return _select_samples(forecast.rollouts, forecast.targets, criterion)


@partial(jax.jit, static_argnums=2)
def _select_samples(rollouts, targets, criterion):
    forecast = Forecast(rollouts, targets, None, 0)
    selections = {"mean": (jnp.mean(rollouts.astype(jnp.float32), axis=1), None)}
    if rollouts.shape[1] > 1:
        last = rollouts[:, :, -1]
        losses = jnp.mean(criterion(last, forecast.targets[:, None, -1]), axis=(-2, -1))  # [B, S]
        selections["best"] = best_of_k(losses, rollouts)
    return selections
