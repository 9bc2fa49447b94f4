"""DINOv3 and the pixel-patch VFM: parity with `transformers.DINOv3ViTModel` on random weights saved to disk and
loaded through `load_dinov3`, RoPE augmentation, bad inputs, presets. Tiny models (width 64, 2 layers)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from deltaworld_jax.models import basic_layers, rope
from deltaworld_jax.models.dinov3 import IMAGENET_MEAN, IMAGENET_STD, PRESETS, DINOv3, DINOv3Config, PixelPatchVFM
from deltaworld_jax.pretrained import load_dinov3

TINY_CONFIGS = {
    # registers, GELU MLP, patch 8
    "registers": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      patch_size=8, num_register_tokens=4),
    # SwiGLU (use_gated_mlp, silu), patch 16, one register, 3 layers
    "swiglu": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   patch_size=16, num_register_tokens=1, use_gated_mlp=True, hidden_act="silu"),
}
FRAME_HW = {"registers": (16, 24), "swiglu": (32, 16)}  # non-square frames


def make_hf_model(seed: int = 0, **config) -> DINOv3ViTModel:
    """A random transformers DINOv3 in eval mode whose norms, layer scales and biases are random too (the
    defaults 1/0 would hide a mix-up of weight and bias, or a missing layer scale)."""
    torch.manual_seed(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "lambda1" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "lambda1" in name else 0.0))
            elif "norm" in name:
                p.copy_(1.0 + torch.randn_like(p) * 0.3)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)  # sharper attention, so positions (RoPE) and attention weights matter
    return model


def reference_patch_features(model: DINOv3ViTModel, frames_bhwc: np.ndarray) -> np.ndarray:
    pixels = (torch.from_numpy(frames_bhwc.astype(np.float32)) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD)
    with torch.no_grad():
        out = model(pixel_values=pixels.permute(0, 3, 1, 2)).last_hidden_state
    return out[:, 1 + model.config.num_register_tokens :].numpy()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    out = {}
    for i, (name, cfg) in enumerate(TINY_CONFIGS.items()):
        model = make_hf_model(seed=i, **cfg)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


def _frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def jitted(model):
    """model(frames, rope_rng=...) as one compiled program: eager op-by-op dispatch is far slower on CPU."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, rng: nnx.merge(graphdef, s)(x, rope_rng=rng))
    return lambda frames, rope_rng=None: forward(state, jnp.asarray(frames), rope_rng)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parity_with_transformers_fp32_and_bf16(saved_models, name):
    hf_model, folder = saved_models[name]
    h, w = FRAME_HW[name]
    frames = _frames((2, 3, h, w, 3), seed=1)  # [B, T, H, W, 3]
    ref = reference_patch_features(hf_model, frames.reshape(6, h, w, 3)).reshape(2, 3, -1, 64)
    scale = np.abs(ref).max()

    ours = load_dinov3(folder)
    out = np.asarray(jitted(ours)(frames))
    assert out.shape == ref.shape == (2, 3, (h // ours.patch_size) * (w // ours.patch_size), 64)
    fp32_err = np.abs(out - ref).max() / scale
    assert fp32_err <= 1e-5, fp32_err

    ours_bf16 = load_dinov3(folder, dtype=jnp.bfloat16)
    out_bf16 = jitted(ours_bf16)(frames)
    assert out_bf16.dtype == jnp.bfloat16
    assert ours_bf16.layer[0].attention.q_proj.kernel.get_value().dtype == jnp.float32  # fp32 params
    bf16_err = np.abs(np.asarray(out_bf16, np.float32) - ref).max() / scale
    assert bf16_err <= 2e-2, bf16_err
    print(f"{name}: fp32 max|err|/max|ref| = {fp32_err:.2e}, bf16 = {bf16_err:.2e}")

    # [B, H, W, 3] in gives [B, N, D] out, the same features as with a time axis.
    single = np.asarray(jitted(ours)(frames[:, 0]))
    np.testing.assert_allclose(single, out[:, 0], atol=1e-5 * scale)  # batch size changes XLA's tiling


def test_rope_augmentation_is_rng_driven(saved_models):
    model = load_dinov3(saved_models["registers"][1])
    grid = (2, 3)
    plain = model.rope(grid)
    same_a, same_b = model.rope(grid, jax.random.key(1)), model.rope(grid, jax.random.key(1))
    other = model.rope(grid, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(same_a[0]), np.asarray(same_b[0]))
    assert not np.allclose(np.asarray(same_a[0]), np.asarray(other[0]))
    assert not np.allclose(np.asarray(same_a[0]), np.asarray(plain[0]))
    np.testing.assert_allclose(np.asarray(plain[0]), np.asarray(rope.rope_2d(grid, 16)[0]))

    forward = jitted(model)
    frames = _frames((1, 16, 24, 3), seed=3)
    no_aug = np.asarray(forward(frames))
    aug1 = np.asarray(forward(frames, jax.random.key(1)))
    np.testing.assert_array_equal(np.asarray(forward(frames, jax.random.key(1))), aug1)
    scale = np.abs(no_aug).max()
    assert np.abs(aug1 - no_aug).max() > 1e-3 * scale
    assert np.abs(aug1 - np.asarray(forward(frames, jax.random.key(2)))).max() > 1e-3 * scale


@pytest.mark.parametrize("shape,message", [
    ((1, 20, 24, 3), "20x24 is not a multiple of the patch size 8"),
    ((1, 16, 24, 4), "3 \\(RGB\\) channels"),
    ((16, 24, 3), "must be \\[B, H, W, 3\\] or \\[B, T, H, W, 3\\]"),
    ((1, 1, 1, 16, 24, 3), "must be \\[B, H, W, 3\\] or \\[B, T, H, W, 3\\]"),
])
def test_bad_frames_are_refused_clearly(saved_models, shape, message):
    model = load_dinov3(saved_models["registers"][1])  # patch 8
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros(shape, jnp.uint8))
    with pytest.raises(ValueError, match=message):
        PixelPatchVFM(8)(jnp.zeros(shape, jnp.uint8))


def test_config_validation_and_from_hf_config(saved_models):
    with pytest.raises(ValueError, match="not divisible"):
        DINOv3Config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        DINOv3Config(hidden_size=24, num_heads=4)
    with pytest.raises(ValueError, match="unknown DINOv3 preset"):
        DINOv3Config.preset("vitz99")
    with pytest.raises(ValueError, match="not 'dinov3_vit'"):
        DINOv3Config.from_hf_config({"model_type": "dinov2"})
    hf = saved_models["swiglu"][0].config.to_dict()
    cfg = DINOv3Config.from_hf_config(hf)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.patch_size) == (64, 3, 4, 96, 16)
    assert cfg.use_gated_mlp and cfg.hidden_act == "silu" and cfg.num_register_tokens == 1 and not cfg.key_bias


def _hf_config_of(cfg: DINOv3Config) -> DINOv3ViTConfig:
    return DINOv3ViTConfig(
        patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, hidden_act=cfg.hidden_act,
        use_gated_mlp=cfg.use_gated_mlp, num_register_tokens=cfg.num_register_tokens, query_bias=cfg.query_bias,
        value_bias=cfg.value_bias, key_bias=cfg.key_bias)


# Published sizes (DINOv3 model card): parameters in millions.
PUBLISHED_MILLIONS = {"vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300, "vith16plus": 840, "vit7b16": 6716}


def _counts(cfg: DINOv3Config) -> tuple[int, int]:
    """(ours, transformers') parameter counts; ours built abstractly (nothing allocated), theirs on torch's meta
    device, minus its mask token (masked pre-training only, not a parameter here)."""
    ours = basic_layers.count_params(nnx.eval_shape(lambda: DINOv3(cfg, rngs=nnx.Rngs(0))))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in DINOv3ViTModel(_hf_config_of(cfg)).parameters()) - cfg.hidden_size
    return ours, theirs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts(preset):
    """Same structure as transformers' module of the same config, and the full-depth count within 3% of the
    published size. Counted at depth 1 and 2 and extrapolated (every layer is the same), to stay fast."""
    cfg = DINOv3Config.preset(preset)
    one, one_ref = _counts(dataclasses.replace(cfg, num_layers=1))
    two, two_ref = _counts(dataclasses.replace(cfg, num_layers=2))
    assert (one, two) == (one_ref, two_ref)
    full = one + (cfg.num_layers - 1) * (two - one)
    assert abs(full / 1e6 - PUBLISHED_MILLIONS[preset]) <= 0.03 * PUBLISHED_MILLIONS[preset], full


def test_vitb16_parameter_count():
    """ViT-B/16 built abstractly: every nnx.Param (patch conv, CLS, 4 registers, 12 blocks, final norm)."""
    d, i, p, layers_ = 768, 3072, 16, 12
    embeddings = (3 * p * p * d + d) + d + 4 * d  # patch conv + bias, CLS, registers
    block = 4 * d + (4 * d * d + 3 * d) + 2 * d + (2 * d * i + i + d)  # norms, q/k/v/o (no k bias), scales, MLP
    ours, theirs = _counts(DINOv3Config.preset("vitb16"))
    assert ours == theirs == embeddings + layers_ * block + 2 * d
    print(f"ViT-B/16 parameters: {ours:,}")


def test_vitb16_is_the_default_and_paper_backbone():
    cfg = DINOv3Config()
    assert cfg == PRESETS["vitb16"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.num_register_tokens) == (
        768, 12, 12, 3072, 4)
    assert (cfg.layer_norm_eps, cfg.rope_theta, cfg.key_bias, cfg.hidden_act) == (1e-5, 100.0, False, "gelu")


# ---------------------------------------------------------------------------------------------------
# PixelPatchVFM
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch,heads", [(16, 12), (8, 3), (4, 3)])
def test_pixel_vfm_interface(patch, heads):
    vfm = PixelPatchVFM(patch)
    assert (vfm.hidden_size, vfm.num_heads, vfm.init_std) == (3 * patch * patch, heads, 0.02)
    assert (vfm.hidden_size // vfm.num_heads) % 4 == 0
    assert basic_layers.count_params(vfm) == 0


def test_pixel_vfm_features_and_inverse():
    vfm = PixelPatchVFM(4)
    frames = _frames((2, 3, 8, 12, 3), seed=4)
    feats = vfm(jnp.asarray(frames))
    assert feats.shape == (2, 3, 6, 48)
    # Patch (row 1, column 2) of frame [0, 0] is the normalised 4x4x3 block at rows 4:8, columns 8:12.
    block = (frames[0, 0, 4:8, 8:12].astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(np.asarray(feats[0, 0, 1 * 3 + 2]), block.reshape(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(vfm.patches_to_frames(feats, vfm.grid_hw(frames.shape))), frames)
    assert vfm.patches_to_frames(feats + 100.0, (2, 3)).max() == 255  # clipped, not wrapped
    with pytest.raises(ValueError, match="do not match grid"):
        vfm.patches_to_frames(feats, (3, 3))
    with pytest.raises(ValueError, match="multiple of 4"):
        PixelPatchVFM(4, num_heads=8)  # head_dim 6
    assert vfm(jnp.asarray(frames), rope_rng=jax.random.key(0)).shape == feats.shape
    assert PixelPatchVFM(4, dtype=jnp.bfloat16)(jnp.asarray(frames)).dtype == jnp.bfloat16
    # Input forms (shared with DINOv3): float [0, 255] == uint8; [B, H, W, 3] == [B, 1, H, W, 3].
    np.testing.assert_allclose(np.asarray(vfm(jnp.asarray(frames, jnp.float32))), np.asarray(feats), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(vfm(jnp.asarray(frames[:, 0]))), np.asarray(feats[:, 0]))


def test_pixel_vfm_position_channels():
    """The demo's VFM: pixels, then fixed codes of the patch position (the same in every frame, distinct
    per patch); the pictures come from the pixel part alone."""
    from deltaworld_jax.models.dinov3 import position_channels

    vfm = PixelPatchVFM(4, num_heads=4, num_position_channels=16)
    assert (vfm.pixel_size, vfm.hidden_size, vfm.num_heads) == (48, 64, 4)
    frames = _frames((2, 3, 8, 12, 3), seed=5)
    feats = np.asarray(vfm(jnp.asarray(frames)))
    assert feats.shape == (2, 3, 6, 64)
    np.testing.assert_allclose(feats[..., :48], np.asarray(PixelPatchVFM(4)(jnp.asarray(frames))), atol=1e-6)
    codes = position_channels((2, 3), 16)
    np.testing.assert_allclose(feats[..., 48:], np.broadcast_to(codes, (2, 3, 6, 16)), atol=1e-6)
    # Patch (row 1, column 2): sin/cos of the lowest frequency at its centre (column 2.5 of 3, row 1.5 of 2).
    np.testing.assert_allclose(codes[1 * 3 + 2, :4], [np.sin(np.pi * 2.5 / 3), np.cos(np.pi * 2.5 / 3),
                                                       np.sin(np.pi * 1.5 / 2), np.cos(np.pi * 1.5 / 2)], atol=1e-6)
    assert len({tuple(np.round(c, 5)) for c in codes}) == 6  # every patch has its own code
    np.testing.assert_array_equal(np.asarray(vfm.patches_to_frames(jnp.asarray(feats), (2, 3))), frames)
    with pytest.raises(ValueError, match="multiple of 4"):
        PixelPatchVFM(4, num_position_channels=6)
    from deltaworld_jax.pretrained.dinov3 import build_vfm

    built = build_vfm({"kind": "pixel", "patch_size": 4, "position_channels": 16, "num_heads": 4})
    assert (built.hidden_size, built.num_heads) == (64, 4)
