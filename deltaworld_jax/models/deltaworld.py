"""DeltaWorld: a generative world model over DeltaTok's one-token-per-frame delta tokens.

Official semantics (amazon-far/deltatok models/deltaworld.py, models/world.py, training/world.py):
- Training: tokens z [B, T, D] of a clip (DeltaTok.tokenize_clip). Frame i >= 1 is predicted from tokens
  0..i-1 (frame-causal mask), query position t_i, key positions t_0..t_{T-2}. Queries are noise
  N(0, 1) * init_std; best-of-K: K candidates per predicted frame are scored WITHOUT gradient, the argmin of
  each candidate's mean smooth-L1 is kept, and the predictor runs again on the chosen queries WITH gradient.
  Loss: smooth-L1 (beta 0.1) between predicted and true tokens, averaged.
- Rollout: S noise queries per step predict S next tokens, each decoded by DeltaTok from its own previous
  (predicted) features, starting from the last context frame's true features; the predicted token is
  appended to that sample's key/values.

This module owns ONLY the predictor (and `q_embed` in the deterministic variant): the VFM and the tokenizer
are frozen and passed in, so the trainer keeps them out of the optimiser and the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deltaworld_jax.models.predictor import frame_causal_mask
from deltaworld_jax.models.world import WorldConfig, WorldModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DeltaWorldConfig(WorldConfig):
    """Released DeltaWorld: 12 blocks, width 768, 12 heads, 1-D RoPE 60 + 4, best-of-256 training,
    best-of-20 evaluation."""

    rope_axis_sizes: tuple[int, ...] = (60,)
    use_bom: bool = True
    num_samples_train: int = 256
    num_samples_eval: int = 20


def _check_clip(tokens_btd: Array, timestamps_bt: Array, width: int) -> None:
    if tokens_btd.ndim != 3 or tokens_btd.shape[-1] != width:
        raise ValueError(f"tokens must be [B, T, {width}], got {tokens_btd.shape}")
    if timestamps_bt.shape != tokens_btd.shape[:2]:
        raise ValueError(f"timestamps {timestamps_bt.shape} must be [B, T] = {tokens_btd.shape[:2]}")
    if tokens_btd.shape[1] < 2:
        raise ValueError(f"a training clip needs at least 2 frames, got {tokens_btd.shape[1]}")


class DeltaWorld(WorldModel):
    """The world model over delta tokens: key/values are the past frames' tokens, one query per frame."""

    # ------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------

    def _train_layout(self, timestamps_bt: Array):
        num_frames = timestamps_bt.shape[1]
        pos_q = (timestamps_bt[:, 1:],)  # frame i >= 1 is predicted at its own time
        pos_k = (timestamps_bt[:, :-1],)  # from the tokens of frames 0..T-2
        return pos_q, pos_k, np.arange(1, num_frames), np.arange(num_frames - 1)  # static frame ids

    def predict_next_tokens(self, queries_bfd: Array, tokens_btd: Array, timestamps_bt: Array) -> Array:
        """The loss pass: one query per frame 1..T-1 -> predicted tokens [B, T-1, D] (frame-causal)."""
        pos_q, pos_k, q_frames, k_frames = self._train_layout(timestamps_bt)
        return self.predictor(queries_bfd, tokens_btd[:, :-1], pos_q, pos_k, frame_causal_mask(q_frames, k_frames))

    def train_queries(self, tokens_btd: Array, timestamps_bt: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Queries of the loss pass [B, T-1, hidden]: the best of K noise candidates per frame (no gradient
        flows through the choice), or the learned q_embed in the deterministic variant."""
        _check_clip(tokens_btd, timestamps_bt, self.cfg.backbone_hidden_size)
        b, t = tokens_btd.shape[:2]
        pos_q, pos_k, q_frames, k_frames = self._train_layout(timestamps_bt)
        return self._loss_queries(b, t - 1, rng, kv_tokens=tokens_btd[:, :-1],
                                  pos_q_bfp=tuple(p[:, :, None] for p in pos_q), pos_k=pos_k, q_frames=q_frames,
                                  k_frames=k_frames, targets_bfpd=tokens_btd[:, 1:, None])

    def loss(self, tokens_btd: Array, timestamps_bt: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
        """Mean smooth-L1 between predicted and true tokens of frames 1..T-1, and metrics."""
        tokens_btd = jax.lax.stop_gradient(tokens_btd.astype(jnp.float32))
        queries, metrics = self.train_queries(tokens_btd, timestamps_bt, rng)
        return self._mean_loss(self.predict_next_tokens(queries, tokens_btd, timestamps_bt), tokens_btd[:, 1:],
                               metrics)

    # ------------------------------------------------------------------------------------------------
    # Rollout (evaluation)
    # ------------------------------------------------------------------------------------------------

    def rollout(
        self,
        tokenizer: Any,
        feats_btnd: Array,
        timestamps_bt: Array,
        *,
        grid_hw: tuple[int, int],
        ctx_len: int,
        rng: Array | None,
        num_samples: int | None = None,
        black_bnd: Array | None = None,
        context_tokens_btd: Array | None = None,
    ) -> tuple[Array, Array]:
        """Forecast the frames after the context, `num_samples` futures per clip, as one traced program.

        feats_btnd: VFM features of the clip [B, ctx_len + horizon, N, D] (the frames after the context are
        only targets); timestamps_bt: [B, ctx_len + horizon]; grid_hw: the patch grid (for DeltaTok's RoPE);
        context tokens: `context_tokens_btd` [B, >= ctx_len, D] if given, else DeltaTok.tokenize_clip of the
        context against `black_bnd` (VFM features of an all-black frame).
        Returns (predicted features [B, S, horizon, N, D], targets [B, horizon, N, D]).
        The horizon is a static Python unroll (a few steps), each step predicting all B*S samples at once;
        jit the call (e.g. nnx.jit with static ctx_len / grid_hw / num_samples)."""
        num_samples = num_samples or self.num_rollout_samples
        b, t, n, d = feats_btnd.shape
        step_rngs = self._rollout_rngs(t, ctx_len, rng)
        if timestamps_bt.shape != (b, t):
            raise ValueError(f"timestamps {timestamps_bt.shape} must be [B, T] = {(b, t)}")
        rope = tokenizer.rope(tuple(grid_hw), rng=None)
        if context_tokens_btd is None:
            if black_bnd is None:
                raise ValueError("rollout needs context_tokens_btd or black_bnd (features of a black frame)")
            context_tokens_btd = tokenizer.tokenize_clip(feats_btnd[:, :ctx_len], black_bnd, rope)
        if context_tokens_btd.shape[1] < ctx_len:
            raise ValueError(f"{context_tokens_btd.shape[1]} context tokens for ctx_len {ctx_len}")

        def per_sample(x):  # [B, ...] -> [B*S, ...], sample-major inside each clip
            return jnp.repeat(x, num_samples, axis=0)

        kv = per_sample(jax.lax.stop_gradient(context_tokens_btd[:, :ctx_len]).astype(jnp.float32))
        prev_feats = per_sample(feats_btnd[:, ctx_len - 1])
        times = per_sample(timestamps_bt)
        predictions = []
        for step, step_rng in enumerate(step_rngs):
            target_frame = ctx_len + step
            queries = self._rollout_queries(step_rng, b * num_samples)
            token = self.predictor(queries, kv, (times[:, target_frame:target_frame + 1],),
                                   (times[:, :kv.shape[1]],), None).astype(jnp.float32)
            prev_feats = tokenizer.decode(token, prev_feats, rope)
            predictions.append(prev_feats)
            kv = jnp.concatenate([kv, token], axis=1)
        preds = jnp.stack(predictions, axis=1).reshape(b, num_samples, len(step_rngs), n, -1)
        return preds, feats_btnd[:, ctx_len:]

