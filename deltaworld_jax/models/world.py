"""What DeltaWorld and DINO-World share (official amazon-far/deltatok models/world.py): the config fields,
the predictor, the query scheme and its bookkeeping; each model adds its own key/values and positions
(DeltaWorld: one delta token per frame; DINO-World: every patch of every frame).

The query scheme: with `use_bom`, noise queries N(0, 1) * init_std, the best of K candidates per predicted
frame in training (scored without gradient, predictor.select_best_queries) and S independent samples in a
rollout; without it, one learned query `q_embed` (1 x hidden), so the model is deterministic. Parameter
paths (`predictor.*`, `q_embed`) are those of the official modules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax.models import basic_layers, block_stack
from deltaworld_jax.models.predictor import (
    Predictor, PredictorConfig, noise_queries, select_best_queries, smooth_l1_loss_fn)
from deltaworld_jax.objectives import smooth_l1

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Fields shared by DeltaWorld and DINO-World: the predictor's sizes plus the query scheme.
    `config.model` of a world-model run holds these fields (plus `kind`)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    backbone_hidden_size: int = 768
    mlp_ratio: int = 4
    rope_axis_sizes: tuple[int, ...] = (60,)
    rope_unrotated_size: int = 4
    layer_scale_init: float = 1e-5
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_impl: str | None = "xla"  # models/attention.py
    remat: str = block_stack.DEFAULT_REMAT  # the predictor's block rematerialisation: block_stack.REMAT_POLICIES
    scan_layers: bool = False  # the predictor's block layout (PredictorConfig.scan_layers)
    use_bom: bool = True  # noise queries + best-of-K training; False: one learned query (q_embed)
    num_samples_train: int = 256  # K, the candidates per predicted frame in best-of-K training
    num_samples_eval: int = 20  # S, the rollouts drawn per clip at evaluation (use_bom only)
    bom_chunk: int | None = 64  # candidates per pass of the best-of-K search (memory); None: all K at once
    loss_beta: float = 0.1  # smooth-L1 beta

    def __post_init__(self):
        object.__setattr__(self, "rope_axis_sizes", tuple(self.rope_axis_sizes))
        self.predictor_config()  # validates the sizes now, with a clear message

    def predictor_config(self) -> PredictorConfig:
        names = {f.name for f in dataclasses.fields(PredictorConfig)}
        return PredictorConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


class WorldModel(nnx.Module):
    """The predictor (and `q_embed` in the deterministic variant), and the query scheme around it."""

    def __init__(self, cfg: WorldConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.predictor = Predictor(cfg.predictor_config(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not cfg.use_bom:
            init = basic_layers.trunc_normal(cfg.init_std)
            self.q_embed = nnx.Param(init(rngs.params(), (1, cfg.hidden_size), param_dtype),
                                     out_sharding=(None, "embed"))

    @property
    def num_rollout_samples(self) -> int:
        """S: rollouts drawn per clip (1 for the deterministic variant, whose rollouts are all equal)."""
        return self.cfg.num_samples_eval if self.cfg.use_bom else 1

    def _loss_queries(self, batch: int, num_frames: int, rng: Array | None,
                      **search) -> tuple[Array, dict[str, Array]]:
        """Queries of the loss pass, one per predicted frame [B, F, hidden], and metrics: the learned q_embed,
        or the best of K noise candidates (`search`: select_best_queries' key/values, positions, frame ids
        and targets; no gradient flows through the choice) with the search's metrics."""
        if not self.cfg.use_bom:
            return jnp.broadcast_to(self.q_embed[...], (batch, num_frames, self.cfg.hidden_size)), {}
        if rng is None:
            raise ValueError(f"the best-of-K {type(self).__name__} needs an rng for its noise queries")
        queries, index, best_loss = select_best_queries(
            self.predictor, rng, num_candidates=self.cfg.num_samples_train, chunk_size=self.cfg.bom_chunk,
            loss_fn=smooth_l1_loss_fn(self.cfg.loss_beta), **search)
        return queries, {"bom_best_loss": jnp.mean(best_loss), "bom_index_mean": jnp.mean(index.astype(jnp.float32))}

    def _mean_loss(self, preds: Array, targets: Array, metrics: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        """The training loss: mean smooth-L1 (beta `loss_beta`) of the predictions, with the metrics."""
        loss = jnp.mean(smooth_l1(preds, targets, self.cfg.loss_beta))
        return loss, {"loss": loss, **metrics}

    def _rollout_queries(self, rng: Array | None, count: int) -> Array:
        """One query per rollout sample for the next step [count, 1, hidden]: fresh noise, or q_embed."""
        if self.cfg.use_bom:
            return noise_queries(rng, (count, 1), self.cfg.hidden_size, self.cfg.init_std)
        return jnp.broadcast_to(self.q_embed[...], (count, 1, self.cfg.hidden_size))

    def _rollout_rngs(self, num_frames: int, ctx_len: int, rng: Array | None) -> list:
        """One rng per step after the context (None each for the deterministic variant), with clear errors
        for a context that leaves no step or a missing rng."""
        if not 1 <= ctx_len < num_frames:
            raise ValueError(f"ctx_len {ctx_len} must be in [1, {num_frames - 1}] for a clip of {num_frames} frames")
        horizon = num_frames - ctx_len
        if not self.cfg.use_bom:
            return [None] * horizon
        if rng is None:
            raise ValueError(f"the best-of-K {type(self).__name__} needs an rng for its rollout queries")
        return list(jax.random.split(rng, horizon))
