"""The frozen vision foundation model (VFM): DINOv3 ViT, and a parameter-free pixel-patch stand-in.

Both map frames (uint8 or float in [0, 255], [B, T, H, W, 3] or [B, H, W, 3], channels last) to
final-normed PATCH features [B, T, N, D] / [B, N, D] with N = (H/p) * (W/p) in row-major patch order.
Preprocessing (x/255, ImageNet mean/std) happens inside, so callers pass raw frames; there is no resize or
crop. Module and parameter names follow `transformers`' `DINOv3ViTModel` (embeddings.cls_token,
layer.N.attention.q_proj, norm, ...) so importing its weights is a plain rename plus transposes
(`deltaworld_jax/pretrained/dinov3.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models import basic_layers, block_stack, blocks, rope

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
    """DINOv3 ViT hyper-parameters; field names follow `transformers.DINOv3ViTConfig` where they exist.
    The defaults are ViT-B/16 (`facebook/dinov3-vitb16-pretrain-lvd1689m`)."""

    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_register_tokens: int = 4
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False  # SwiGLU (ViT-S+/16, ViT-H+/16, ViT-7B/16)
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale_value: float = 1.0
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    # Train-time RoPE coordinate augmentation (used only when a `rope_rng` is passed).
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0
    initializer_range: float = 0.02
    # The attention kernel (models/attention.py): "xla", "auto" (per backend), "cudnn", "splash", "reference";
    # None: "xla".
    attention_impl: str | None = "xla"
    # Layout of the blocks (not a transformers field): False, per-layer modules `layer.{i}` as transformers
    # names them; True, one block_stack.BlockStack `layer.stacked` with [num_layers, ...] parameters (the
    # recipe configs' choice: a shorter compile). Both compute the same function and load the same weights.
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"head_dim {self.hidden_size // self.num_heads} must be a multiple of 4 for 2-D RoPE")
        if self.hidden_act not in basic_layers.ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; known: {sorted(basic_layers.ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "DINOv3Config":
        """One of PRESETS ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")."""
        if name not in PRESETS:
            raise ValueError(f"unknown DINOv3 preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "DINOv3Config":
        """From a `transformers` DINOv3ViT `config.json` (as a dict). Keys we do not model (image_size,
        dropout rates, backbone outputs) are ignored; a non-DINOv3 config is refused."""
        model_type = hf.get("model_type", "dinov3_vit")
        if model_type != "dinov3_vit":
            raise ValueError(f"config.json is for model_type {model_type!r}, not 'dinov3_vit'")
        patch = hf.get("patch_size", 16)
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"non-square patches {patch} are not supported")
            patch = patch[0]
        if hf.get("num_channels", 3) != 3:
            raise ValueError(f"num_channels {hf['num_channels']} != 3: only RGB models are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
        kwargs = {renamed.get(k, k): v for k, v in hf.items() if renamed.get(k, k) in names}
        kwargs["patch_size"] = int(patch)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_block_config(self) -> blocks.BlockConfig:
        attention = blocks.AttentionConfig(
            hidden_size=self.hidden_size, num_heads=self.num_heads, query_bias=self.query_bias,
            key_bias=self.key_bias, value_bias=self.value_bias, proj_bias=self.proj_bias,
            norm_eps=self.layer_norm_eps, init_std=self.initializer_range, implementation=self.attention_impl)
        return blocks.BlockConfig(
            attention=attention, intermediate_size=self.intermediate_size, gated_mlp=self.use_gated_mlp,
            act=self.hidden_act, mlp_bias=self.mlp_bias, layer_scale_init=self.layerscale_value,
            norm_eps=self.layer_norm_eps, init_std=self.initializer_range)


# The released DINOv3 ViTs (LVD-1689M). The SwiGLU models' intermediate sizes are the official
# 2/3 * mlp_ratio * hidden (ViT-S+ and ViT-H+ use mlp_ratio 6, ViT-7B 3); the 7B has no q/v biases.
PRESETS: dict[str, DINOv3Config] = {
    "vits16": DINOv3Config(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "vits16plus": DINOv3Config(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536,
                               use_gated_mlp=True, hidden_act="silu"),
    "vitb16": DINOv3Config(),
    "vitl16": DINOv3Config(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "vith16plus": DINOv3Config(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                               use_gated_mlp=True, hidden_act="silu"),
    "vit7b16": DINOv3Config(hidden_size=4096, num_layers=40, num_heads=32, intermediate_size=8192,
                            use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False),
}


# ----------------------------------------------------------------------------------------------------
# Input handling shared by both VFMs
# ----------------------------------------------------------------------------------------------------


def grid_hw_for(frames_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """(H/p, W/p) for frames [..., H, W, 3], with a clear error for a bad shape."""
    if len(frames_shape) not in (4, 5):
        raise ValueError(
            f"frames must be [B, H, W, 3] or [B, T, H, W, 3] (channels last), got shape {tuple(frames_shape)}")
    h, w, c = frames_shape[-3:]
    if c != 3:
        raise ValueError(f"frames must have 3 (RGB) channels last, got {c} in shape {tuple(frames_shape)}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {patch_size}")
    return h // patch_size, w // patch_size


def normalize_frames(frames: Array) -> Array:
    """uint8 / float [0, 255] -> ImageNet-normalised float32 (x/255 - mean) / std."""
    x = frames.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def _flatten_time(frames: Array) -> tuple[Array, tuple[int, ...]]:
    """[B, T, H, W, 3] -> [B*T, H, W, 3], remembering the leading dims ([B, T] or [B])."""
    lead = frames.shape[:-3]
    return frames.reshape((-1,) + frames.shape[-3:]), lead


# ----------------------------------------------------------------------------------------------------
# DINOv3
# ----------------------------------------------------------------------------------------------------


class Embeddings(nnx.Module):
    """CLS + register tokens + patch embedding (a conv with kernel = stride = patch). The mask token of
    `transformers`' module only serves masked pre-training, so it is not a parameter here."""

    def __init__(self, cfg: DINOv3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        init = basic_layers.trunc_normal(cfg.initializer_range)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype), out_sharding=(None, None, "embed"))
        self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_register_tokens, d), param_dtype),
                                         out_sharding=(None, None, "embed"))
        self.patch_embeddings = nnx.Conv(
            3, d, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(init, (None, None, None, "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)

    def __call__(self, pixels_bhwc: Array) -> Array:
        patches = self.patch_embeddings(pixels_bhwc)  # [B, H/p, W/p, D]
        b, gh, gw, d = patches.shape
        # The residual stream stays float32 (matmuls run in the compute dtype): cheap for a frozen ViT and
        # keeps bf16 features close to the float32 ones.
        patches = patches.reshape(b, gh * gw, d).astype(jnp.float32)
        prefix = jnp.concatenate([self.cls_token.get_value(), self.register_tokens.get_value()], axis=1)
        prefix = jnp.broadcast_to(prefix.astype(jnp.float32), (b,) + prefix.shape[1:])
        return jnp.concatenate([prefix, patches], axis=1)


class DINOv3(nnx.Module):
    """DINOv3 ViT (`transformers.DINOv3ViTModel` semantics) returning final-normed patch features."""

    def __init__(self, config: DINOv3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.init_std = config.initializer_range
        self.dtype = dtype
        self.embeddings = Embeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_cfg = config.to_block_config()
        self.layer = block_stack.make_blocks(
            config.num_layers, lambda r: blocks.Block(block_cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
            stacked=config.scan_layers, rngs=rngs)
        self.norm = basic_layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.rope_augmentation = rope.RopeAugmentation(
            shift=config.pos_embed_shift, jitter=config.pos_embed_jitter, rescale=config.pos_embed_rescale)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def grid_hw(self, frames_shape: tuple[int, ...]) -> tuple[int, int]:
        return grid_hw_for(frames_shape, self.patch_size)

    def rope(self, grid_hw: tuple[int, int], rope_rng: Array | None = None) -> tuple[Array, Array]:
        """2-D RoPE tables for the patch tokens; augmented (train mode) only when `rope_rng` is given."""
        return rope.rope_2d(grid_hw, self.config.head_dim, theta=self.config.rope_theta,
                              augmentation=self.rope_augmentation, rng=rope_rng)

    def __call__(self, frames: Array, *, rope_rng: Array | None = None) -> Array:
        grid = self.grid_hw(frames.shape)
        flat, lead = _flatten_time(frames)
        pixels = normalize_frames(flat).astype(self.dtype)
        tokens = self.embeddings(pixels)
        rope = self.rope(grid, rope_rng)
        # One scan over the identical blocks (compiled once); the RoPE table goes to every layer.
        tokens = block_stack.run_blocks(self.layer, tokens, rope, implementation=self.config.attention_impl)
        features = self.norm(tokens)[:, self.num_prefix_tokens :]
        return features.reshape(lead + features.shape[1:])


# ----------------------------------------------------------------------------------------------------
# Pixel patches: a parameter-free VFM for demos and tests
# ----------------------------------------------------------------------------------------------------


def default_pixel_num_heads(hidden_size: int) -> int:
    """Heads for a pixel-patch width D (3*p*p plus any position channels) with head_dim a multiple of 4
    (2-D RoPE): head_dim 64 where D allows it (p = 8, 16, ...; also 48 + 16 position channels -> 1 head),
    else 16 (p = 4 -> 3 heads), else 3 heads (p = 2, 6, ...). configs/demo.py sets its heads explicitly."""
    for head_dim in (64, 16):
        if hidden_size % head_dim == 0:
            return hidden_size // head_dim
    if (hidden_size // 3) % 4 == 0 and hidden_size % 3 == 0:
        return 3
    raise ValueError(f"no head count gives a head_dim that is a multiple of 4 for width {hidden_size}; "
                     "use an even patch size")


def position_channels(grid_hw: tuple[int, int], num_channels: int) -> np.ndarray:
    """Fixed sinusoidal codes of each patch's grid position, float32 [gh * gw, num_channels].

    Per frequency f_k = pi * 2^k / size (k = 0, 1, ...): sin and cos of f_k * column, then of f_k * row,
    with coordinates at patch centres. The lowest frequency spans the grid once (a half period), so the
    codes are unique over the grid."""
    if num_channels % 4:
        raise ValueError(f"position_channels must be a multiple of 4 (sin/cos x row/column), got {num_channels}")
    gh, gw = grid_hw
    rows, cols = np.meshgrid(np.arange(gh) + 0.5, np.arange(gw) + 0.5, indexing="ij")
    codes = []
    for k in range(num_channels // 4):
        fx, fy = np.pi * 2.0**k / gw, np.pi * 2.0**k / gh
        codes += [np.sin(fx * cols), np.cos(fx * cols), np.sin(fy * rows), np.cos(fy * rows)]
    return np.stack(codes, axis=-1).reshape(gh * gw, num_channels).astype(np.float32)


class PixelPatchVFM(nnx.Module):
    """Features = ImageNet-normalised pixels of each patch, flattened in (row, column, channel) order
    (3*p*p values), then `num_position_channels` fixed codes of the patch's position (position_channels()).
    No parameters, so demos and tests run without DINOv3 weights. `patches_to_frames` inverts the pixel
    part, so predicted features can be shown as pictures.

    Why position channels: DINOv3's features say WHERE a patch is (they are trained to, through RoPE and
    the image context); raw pixels do not. Without them a DeltaTok over pixel features has no way to tell
    from a sum over patches where content moved: measured on the demo's world, its decoder never learned
    to read the token (benchmarks/demo.md). The codes are the same in every frame, so they cost a
    tokenizer nothing to reconstruct and copy-last reproduces them exactly."""

    def __init__(self, patch_size: int = 16, num_heads: int | None = None, *, num_position_channels: int = 0,
                 dtype=jnp.float32, init_std: float = 0.02):
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if num_position_channels < 0 or num_position_channels % 4:
            raise ValueError(f"num_position_channels must be a non-negative multiple of 4, got {num_position_channels}")
        self.patch_size = patch_size
        self.pixel_size = 3 * patch_size * patch_size
        self.num_position_channels = int(num_position_channels)
        self.hidden_size = self.pixel_size + self.num_position_channels
        self.num_heads = num_heads if num_heads is not None else default_pixel_num_heads(self.hidden_size)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"num_heads {self.num_heads} must divide width {self.hidden_size} into heads whose "
                             "size is a multiple of 4")
        self.init_std = init_std
        self.dtype = dtype

    def grid_hw(self, frames_shape: tuple[int, ...]) -> tuple[int, int]:
        return grid_hw_for(frames_shape, self.patch_size)

    def __call__(self, frames: Array, *, rope_rng: Array | None = None) -> Array:
        del rope_rng  # the position codes are fixed: nothing to augment
        gh, gw = self.grid_hw(frames.shape)
        flat, lead = _flatten_time(frames)
        p = self.patch_size
        x = normalize_frames(flat).reshape(-1, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, gh * gw, self.pixel_size)
        if self.num_position_channels:
            codes = jnp.asarray(position_channels((gh, gw), self.num_position_channels))
            x = jnp.concatenate([x, jnp.broadcast_to(codes, x.shape[:1] + codes.shape)], axis=-1)
        return x.reshape(lead + (gh * gw, self.hidden_size)).astype(self.dtype)

    def patches_to_frames(self, features: Array, grid_hw: tuple[int, int]) -> Array:
        """[..., N, D] features -> uint8 frames [..., H, W, 3] (un-normalised, clipped, rounded); the
        position channels, if any, are dropped."""
        gh, gw = grid_hw
        p = self.patch_size
        if features.shape[-2:] != (gh * gw, self.hidden_size):
            raise ValueError(f"features {tuple(features.shape)} do not match grid {grid_hw} x width "
                             f"{self.hidden_size}")
        lead = features.shape[:-2]
        x = features[..., :self.pixel_size].astype(jnp.float32).reshape((-1, gh, gw, p, p, 3))
        x = x.transpose(0, 1, 3, 2, 4, 5)
        x = x * jnp.asarray(IMAGENET_STD, jnp.float32) + jnp.asarray(IMAGENET_MEAN, jnp.float32)
        x = jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)
        return x.reshape(lead + (gh * p, gw * p, 3))

