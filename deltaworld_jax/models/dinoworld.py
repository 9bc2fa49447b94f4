"""DINO-World: the discriminative baseline of the official code, forecasting VFM features directly.

Official semantics (amazon-far/deltatok models/dinoworld.py, models/world.py):
- Keys/values: ALL patch features of the past frames; one query per patch of the frame to predict, the
  learned `q_embed` (1 x hidden) repeated, so the model is deterministic.
- 3-D RoPE over (t, x = width, y = height), 20 + 20 + 20 rotated dims + 4 unrotated per head; spatial
  coordinates linspace(-1, 1, n) WITH endpoints (unlike DINOv3's patch centres), row-major patches.
- Training: frame i >= 1 from the patches of frames 0..i-1 (frame-causal mask); loss smooth-L1 (beta 0.1)
  in feature space, averaged.
- Optional best-of-K variant (`use_bom`): one noise query per (frame, candidate), repeated over the frame's
  patches; K candidates scored without gradient by their mean smooth-L1 over the frame, argmin kept.
- Rollout: predicted features of each step are appended to the key/values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.predictor import frame_causal_mask
from deltaworld_jax.models.world import WorldConfig, WorldModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DINOWorldConfig(WorldConfig):
    """Released DINO-World: the DeltaWorld predictor sizes, 3-D RoPE (20, 20, 20) + 4, deterministic."""

    rope_axis_sizes: tuple[int, ...] = (20, 20, 20)
    use_bom: bool = False
    num_samples_train: int = 16
    num_samples_eval: int = 20
    bom_chunk: int | None = 4


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, steps)`, bit for bit (CPU and CUDA alike): step = (end - start) /
    (steps - 1) rounded to float32, then start + step * i for the first half and end - step * (steps - 1 - i)
    for the second, each a fused multiply-add rounded once. `np.linspace` / `jnp.linspace` differ by 1-3 ulp
    at interior points, which the predictor's high-frequency RoPE amplifies (5e-6 relative on its output).
    The float64 products and sums here are exact (24-bit step times a small integer), so the single final
    rounding to float32 is the FMA's."""
    if steps < 1:
        raise ValueError(f"linspace needs at least one point, got steps={steps}")
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + step * i
    second = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def spatial_positions(grid_hw: tuple[int, int]) -> tuple[Array, Array]:
    """(x, y) RoPE coordinates of the patches, each [H*W] row-major: linspace(-1, 1) WITH endpoints, as the
    official code's torch.linspace. Trace-time constants (numpy), so they cost nothing per step."""
    grid_h, grid_w = grid_hw
    yy, xx = np.meshgrid(torch_linspace(-1.0, 1.0, grid_h), torch_linspace(-1.0, 1.0, grid_w), indexing="ij")
    return jnp.asarray(xx.reshape(-1)), jnp.asarray(yy.reshape(-1))


def frame_positions(times_bf: Array, grid_hw: tuple[int, int]) -> tuple[Array, Array, Array]:
    """(t, x, y) positions of every patch of F frames, frame-major: three [B, F*P] arrays."""
    b, f = times_bf.shape
    x, y = spatial_positions(grid_hw)
    p = x.shape[0]
    return (jnp.repeat(times_bf, p, axis=1), jnp.broadcast_to(jnp.tile(x, f), (b, f * p)),
            jnp.broadcast_to(jnp.tile(y, f), (b, f * p)))


class DINOWorld(WorldModel):
    """The world model over VFM features: key/values are every patch of the past frames, one query per
    patch of the frame to predict (its frame's query repeated)."""

    def __init__(self, cfg: DINOWorldConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if len(cfg.rope_axis_sizes) != 3:
            raise ValueError(f"DINO-World's RoPE has 3 axes (t, x, y), got {cfg.rope_axis_sizes}")
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _check(self, feats_btnd: Array, timestamps_bt: Array, grid_hw: tuple[int, int]) -> None:
        d = self.cfg.backbone_hidden_size
        if feats_btnd.ndim != 4 or feats_btnd.shape[-1] != d:
            raise ValueError(f"features must be [B, T, N, {d}], got {feats_btnd.shape}")
        if feats_btnd.shape[2] != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"{feats_btnd.shape[2]} patches per frame, but grid_hw {tuple(grid_hw)}")
        if timestamps_bt.shape != feats_btnd.shape[:2]:
            raise ValueError(f"timestamps {timestamps_bt.shape} must be [B, T] = {feats_btnd.shape[:2]}")

    # ------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------

    def _train_layout(self, feats_btnd: Array, timestamps_bt: Array, grid_hw: tuple[int, int]):
        b, t, p, d = feats_btnd.shape
        kv = feats_btnd[:, :-1].reshape(b, (t - 1) * p, d)
        pos_q = frame_positions(timestamps_bt[:, 1:], grid_hw)
        pos_k = frame_positions(timestamps_bt[:, :-1], grid_hw)
        q_frames = np.repeat(np.arange(1, t), p)  # static frame ids: the mask stays a FrameCausalMask
        k_frames = np.repeat(np.arange(t - 1), p)
        return kv, pos_q, pos_k, q_frames, k_frames

    def predict_next_frames(self, queries_bfd: Array, feats_btnd: Array, timestamps_bt: Array,
                            grid_hw: tuple[int, int]) -> Array:
        """The loss pass: one query per frame 1..T-1 (repeated over its patches) -> [B, T-1, N, D]."""
        b, t, p, d = feats_btnd.shape
        kv, pos_q, pos_k, q_frames, k_frames = self._train_layout(feats_btnd, timestamps_bt, grid_hw)
        queries = jnp.repeat(queries_bfd, p, axis=1)
        preds = self.predictor(queries, kv, pos_q, pos_k, frame_causal_mask(q_frames, k_frames))
        return preds.reshape(b, t - 1, p, d)

    def train_queries(self, feats_btnd: Array, timestamps_bt: Array, grid_hw: tuple[int, int],
                      rng: Array) -> tuple[Array, dict[str, Array]]:
        """One query per predicted frame [B, T-1, hidden]: q_embed, or the best of K noise candidates."""
        self._check(feats_btnd, timestamps_bt, grid_hw)
        b, t, p, _ = feats_btnd.shape
        kv, _, pos_k, _, k_frames = self._train_layout(feats_btnd, timestamps_bt, grid_hw)
        pos_q_bfp = tuple(pos.reshape(b, t - 1, p) for pos in frame_positions(timestamps_bt[:, 1:], grid_hw))
        return self._loss_queries(b, t - 1, rng, kv_tokens=kv, pos_q_bfp=pos_q_bfp, pos_k=pos_k,
                                  q_frames=np.arange(1, t), k_frames=k_frames, targets_bfpd=feats_btnd[:, 1:])

    def loss(self, feats_btnd: Array, timestamps_bt: Array, grid_hw: tuple[int, int],
             rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """Mean smooth-L1 between predicted and true features of frames 1..T-1 (rng: best-of-K only)."""
        feats_btnd = jax.lax.stop_gradient(feats_btnd.astype(jnp.float32))
        queries, metrics = self.train_queries(feats_btnd, timestamps_bt, grid_hw, rng)
        return self._mean_loss(self.predict_next_frames(queries, feats_btnd, timestamps_bt, grid_hw),
                               feats_btnd[:, 1:], metrics)

    # ------------------------------------------------------------------------------------------------
    # Rollout (evaluation)
    # ------------------------------------------------------------------------------------------------

    def rollout(
        self,
        feats_btnd: Array,
        timestamps_bt: Array,
        *,
        grid_hw: tuple[int, int],
        ctx_len: int,
        rng: Array | None = None,
        num_samples: int | None = None,
    ) -> tuple[Array, Array]:
        """Forecast the frames after the context; each step's predicted features join the key/values.

        feats_btnd [B, ctx_len + horizon, N, D] (frames after the context are only targets).
        Returns (predicted features [B, S, horizon, N, D], targets [B, horizon, N, D]); S = 1 for the
        deterministic model. A static unroll over the (short) horizon: jit the call."""
        self._check(feats_btnd, timestamps_bt, grid_hw)
        num_samples = num_samples or self.num_rollout_samples
        b, t, p, d = feats_btnd.shape
        step_rngs = self._rollout_rngs(t, ctx_len, rng)
        kv = jnp.repeat(jax.lax.stop_gradient(feats_btnd[:, :ctx_len]).reshape(b, ctx_len * p, d),
                        num_samples, axis=0)
        times = jnp.repeat(timestamps_bt, num_samples, axis=0)
        predictions = []
        for step, step_rng in enumerate(step_rngs):
            target_frame = ctx_len + step
            queries = jnp.repeat(self._rollout_queries(step_rng, b * num_samples), p, axis=1)
            pos_q = frame_positions(times[:, target_frame:target_frame + 1], grid_hw)
            pos_k = frame_positions(times[:, :ctx_len + step], grid_hw)
            pred = self.predictor(queries, kv, pos_q, pos_k, None).astype(jnp.float32)
            predictions.append(pred)
            kv = jnp.concatenate([kv, pred], axis=1)
        preds = jnp.stack(predictions, axis=1).reshape(b, num_samples, len(step_rngs), p, d)
        return preds, feats_btnd[:, ctx_len:]
