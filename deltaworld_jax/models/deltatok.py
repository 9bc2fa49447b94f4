"""DeltaTok: encodes the change between two frames' VFM features into ONE token, and decodes it back.

encode(x, y): the sequence [z, x + e0, y + e1] runs through `num_layers` DINOv3-style blocks; the final
LayerNorm of the z position is the delta token [B, 1, D]. x and y share the same RoPE positions (the patch
grid), z is a prefix token and is never rotated.
decode(z, x): the sequence [z, x] (no role embedding on x) runs through a second stack of blocks; the x
positions of the last block (no final norm) are the predicted features of the next frame.

The blocks are transformers' DINOv3ViTLayer as the official code builds them from the ViT-B/16 template
config: LayerNorm eps 1e-5, q/v/o and MLP biases, no key bias, SwiGLU MLP, QK-LayerNorm over head_dim
without bias applied AFTER RoPE, a per-head sigmoid output gate from the attention input, LayerScale 1e-5.
Mixed precision as the official bf16 autocast: matmuls run in `dtype`, while the residual stream, the
token norm and the outputs stay float32 (under autocast the residual adds and LayerNorms are float32).
Each stack of identical blocks runs per-layer, unrolled, or, stored stacked (`DeltaTokConfig.scan_layers`),
as ONE scan (block_stack.run_blocks: compiled once, not per layer); optionally rematerialised
(`DeltaTokConfig.remat`). Parameter names mirror the official module names
(encoder_blocks.{i}.attention.q_proj, z_embed.weight, xy_embed.weight, norm.weight, ...) so importing
released weights is a rename plus transposes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deltaworld_jax.models import basic_layers, block_stack, blocks, rope

Array = jax.Array

# The official code builds every DeltaTok block from the DINOv3 ViT-B/16 config and overrides only the
# width, the number of heads and the patch size with the VFM's. The MLP width therefore always comes from
# the TEMPLATE (3072, or 2*3072//3 = 2048 with SwiGLU), whatever VFM sits underneath.
TEMPLATE_INTERMEDIATE_SIZE = 3072


def default_intermediate_size(use_swiglu: bool, template_intermediate: int = TEMPLATE_INTERMEDIATE_SIZE) -> int:
    """The official MLP width: SwiGLU keeps the parameter count of a GELU MLP by using 2/3 of its width."""
    return max(1, (2 * template_intermediate) // 3) if use_swiglu else template_intermediate


@dataclasses.dataclass(frozen=True)
class DeltaTokConfig:
    hidden_size: int = 768
    num_layers: int = 12  # per stack (encoder and decoder each)
    num_heads: int = 12
    intermediate_size: int = default_intermediate_size(True)
    layer_scale_init: float = 1e-5
    use_delta: bool = True  # False: the ablation that encodes y alone and decodes from a learned constant
    use_qk_norm: bool = True
    use_gated_attn: bool = True
    use_swiglu: bool = True
    use_rope_aug: bool = True  # DINOv3's train-time RoPE rescale, only when rope() gets an rng
    rope_theta: float = 100.0
    rope_rescale: float = 2.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_impl: str | None = "xla"
    # rematerialisation of each stack's scanned block: block_stack.REMAT_POLICIES
    remat: str = block_stack.DEFAULT_REMAT
    # Layout of both stacks: False, per-layer blocks (`encoder_blocks.{i}`, the official names); True, one
    # block_stack.BlockStack each (`encoder_blocks.stacked`, [num_layers, ...] parameters; a shorter compile).
    scan_layers: bool = False

    def __post_init__(self):
        block_stack.check_remat(self.remat)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"head_dim {self.hidden_size // self.num_heads} must be a multiple of 4 for 2-D RoPE "
                "(head_dim/4 frequencies per axis, rotate-half)")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def block_config(self) -> blocks.BlockConfig:
        attention = blocks.AttentionConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            query_bias=True,
            key_bias=False,
            value_bias=True,
            proj_bias=True,
            qk_norm=self.use_qk_norm,
            output_gate=self.use_gated_attn,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            implementation=self.attention_impl,
        )
        return blocks.BlockConfig(
            attention=attention,
            intermediate_size=self.intermediate_size,
            gated_mlp=self.use_swiglu,
            act="silu" if self.use_swiglu else "gelu",
            mlp_bias=True,
            layer_scale_init=self.layer_scale_init,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
        )


class LearnedTokens(nnx.Module):
    """A table of learned vectors, `weight` [num, dim] (torch nn.Embedding used only through .weight).

    Named `weight` (not an nnx.Linear kernel) so the optimiser's decay mask leaves it undecayed, as the
    official optimiser groups do for embeddings."""

    def __init__(self, num: int, dim: int, *, init_std: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        value = basic_layers.trunc_normal(init_std)(rngs.params(), (num, dim), param_dtype)
        self.weight = nnx.Param(value, out_sharding=("vocab", "embed"))


class DeltaTok(nnx.Module):
    """The delta tokenizer. Inputs are VFM patch features [B, N, D]; see the module docstring."""

    def __init__(self, cfg: DeltaTokConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        block_cfg = cfg.block_config()
        self.z_embed = LearnedTokens(1, cfg.hidden_size, init_std=cfg.init_std, param_dtype=param_dtype, rngs=rngs)
        self.xy_embed = LearnedTokens(2, cfg.hidden_size, init_std=cfg.init_std, param_dtype=param_dtype,
                                      rngs=rngs)
        def block(r):
            return blocks.Block(block_cfg, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.encoder_blocks = block_stack.make_blocks(cfg.num_layers, block, stacked=cfg.scan_layers, rngs=rngs)
        self.decoder_blocks = block_stack.make_blocks(cfg.num_layers, block, stacked=cfg.scan_layers, rngs=rngs)
        # float32 output, as the official norm under autocast: the token is what DeltaWorld learns to predict.
        self.norm = basic_layers.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=jnp.float32,
                                     param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------------------------------------
    # RoPE
    # ------------------------------------------------------------------------------------------------

    def rope(self, grid_hw: tuple[int, int], rng: Array | None = None) -> tuple[Array, Array]:
        """(cos, sin) [N, head_dim] for the patch grid, float32. ONE table serves a whole step: the encoder,
        the decoder and every sample. With an rng (DeltaTok training) and `use_rope_aug`, the coordinates
        get DINOv3's default augmentation: one log-uniform rescale in [1/rescale, rescale] for both axes.
        Without an rng (evaluation, or DeltaTok as the frozen tokenizer) there is no augmentation."""
        augmentation = rope.RopeAugmentation(rescale=self.cfg.rope_rescale) if self.cfg.use_rope_aug else None
        return rope.rope_2d(tuple(grid_hw), self.cfg.head_dim, theta=self.cfg.rope_theta,
                              augmentation=augmentation, rng=rng)

    # ------------------------------------------------------------------------------------------------
    # Encode / decode
    # ------------------------------------------------------------------------------------------------

    def _check_features(self, name: str, feats: Array, rope: tuple[Array, Array]) -> None:
        if feats.ndim != 3 or feats.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"{name} must be [B, N, {self.cfg.hidden_size}] features, got shape {feats.shape}")
        if feats.shape[1] != rope[0].shape[-2]:
            raise ValueError(f"{name} has {feats.shape[1]} patches but the RoPE table has {rope[0].shape[-2]}")

    def encode(self, prev_bnd: Array, cur_bnd: Array, rope: tuple[Array, Array]) -> Array:
        """The delta token [B, 1, D] that turns `prev_bnd` (x) into `cur_bnd` (y)."""
        self._check_features("cur_bnd", cur_bnd, rope)
        batch = cur_bnd.shape[0]
        roles = self.xy_embed.weight[...].astype(jnp.float32)
        z = jnp.broadcast_to(self.z_embed.weight[...].astype(jnp.float32)[None], (batch, 1, self.cfg.hidden_size))
        y = cur_bnd.astype(jnp.float32) + roles[1]
        if self.cfg.use_delta:
            self._check_features("prev_bnd", prev_bnd, rope)
            x = prev_bnd.astype(jnp.float32) + roles[0]
            hidden = jnp.concatenate([z, x, y], axis=1)
            # x and y sit on the same patch grid: the table is repeated for the two halves.
            rope = (jnp.concatenate([rope[0], rope[0]], axis=-2), jnp.concatenate([rope[1], rope[1]], axis=-2))
        else:
            hidden = jnp.concatenate([z, y], axis=1)
        # One scan over the blocks; the RoPE table is broadcast to every layer, not scanned.
        hidden = block_stack.run_blocks(self.encoder_blocks, hidden, rope, remat=self.cfg.remat)
        return self.norm(hidden[:, :1])

    def decode(self, token_b1d: Array, prev_bnd: Array, rope: tuple[Array, Array]) -> Array:
        """Predicted features [B, N, D] of the next frame from the delta token and the previous features.
        With `use_delta=False` the previous features are replaced by the learned x role vector (only their
        shape is used)."""
        self._check_features("prev_bnd", prev_bnd, rope)
        if token_b1d.ndim == 2:
            token_b1d = token_b1d[:, None]
        if token_b1d.shape != (prev_bnd.shape[0], 1, self.cfg.hidden_size):
            raise ValueError(
                f"token must be [B, 1, {self.cfg.hidden_size}] with B={prev_bnd.shape[0]}, got {token_b1d.shape}")
        if self.cfg.use_delta:
            x = prev_bnd.astype(jnp.float32)
        else:
            x = jnp.broadcast_to(self.xy_embed.weight[...][0].astype(jnp.float32), prev_bnd.shape)
        hidden = jnp.concatenate([token_b1d.astype(jnp.float32), x], axis=1)
        hidden = block_stack.run_blocks(self.decoder_blocks, hidden, rope, remat=self.cfg.remat)
        return hidden[:, 1:]

    # ------------------------------------------------------------------------------------------------
    # Clips
    # ------------------------------------------------------------------------------------------------

    def tokenize_clip(self, feats_btnd: Array, black_bnd: Array, rope: tuple[Array, Array]) -> Array:
        """Delta tokens [B, T, D] of a clip: pairs (black, f0), (f0, f1), ..., (f_{T-2}, f_{T-1}), encoded
        in ONE batched call. `black_bnd` ([B or 1, N, D]) are the VFM features of an all-black frame."""
        if feats_btnd.ndim != 4:
            raise ValueError(f"feats_btnd must be [B, T, N, D], got shape {feats_btnd.shape}")
        b, t, n, d = feats_btnd.shape
        black = jnp.broadcast_to(black_bnd.astype(feats_btnd.dtype), (b, n, d))
        prev = jnp.concatenate([black[:, None], feats_btnd[:, :-1]], axis=1)
        tokens = self.encode(prev.reshape(b * t, n, d), feats_btnd.reshape(b * t, n, d), rope)
        return tokens.reshape(b, t, d)

    def rollout(self, feats_btnd: Array, black_bnd: Array, horizon: int,
                rope: tuple[Array, Array]) -> tuple[Array, Array]:
        """Reconstruction rollout over the last `horizon` frames (the official evaluation).

        x starts as the features of the frame before the horizon (of the black frame when horizon == T);
        each step encodes (x, ground truth), decodes from x, and the reconstruction becomes the next x.
        Returns (preds, targets), each [B, horizon, N, D]. `horizon` is static."""
        if feats_btnd.ndim != 4:
            raise ValueError(f"feats_btnd must be [B, T, N, D], got shape {feats_btnd.shape}")
        b, t, n, d = feats_btnd.shape
        if not 1 <= horizon <= t:
            raise ValueError(f"horizon must be in [1, {t}] for a clip of {t} frames, got {horizon}")
        if horizon == t:  # no context frame: start from black
            x0 = jnp.broadcast_to(black_bnd, (b, n, d)).astype(jnp.float32)
        else:
            x0 = feats_btnd[:, t - horizon - 1].astype(jnp.float32)
        targets = feats_btnd[:, t - horizon:]

        def step(x, y):
            y_hat = self.decode(self.encode(x, y, rope), x, rope)
            return jax.lax.stop_gradient(y_hat), y_hat

        _, preds = jax.lax.scan(step, x0, jnp.swapaxes(targets, 0, 1))
        return jnp.swapaxes(preds, 0, 1), targets
