"""Unit tests of the shared transformer layers against torch / `transformers` pieces and direct transcriptions
of the official PyTorch semantics. Tiny sizes: every test runs in well under a second after imports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTConfig
from transformers.models.dinov3_vit import modeling_dinov3_vit as hf_dinov3

from deltaworld_jax.models import attention, basic_layers, blocks
from deltaworld_jax.models import rope as rope_lib


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _copy_linear(ours: nnx.Linear, theirs: torch.nn.Linear) -> None:
    """Our kernel is [in, out]; torch's weight is [out, in]."""
    with torch.no_grad():
        theirs.weight.copy_(_t(ours.kernel.get_value()).T)
        if theirs.bias is not None:
            theirs.bias.copy_(_t(ours.bias.get_value()))


def _randomise(module: nnx.Module, seed: int, scale: float = 0.5) -> None:
    """Overwrite every parameter with random values, so that zero biases / unit norms cannot hide a bug."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(rng.normal(0, scale, var.shape), var.get_value().dtype))


# ---------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_hw,head_dim", [((3, 5), 16), ((4, 4), 32), ((2, 7), 48)])
def test_rope_2d_matches_transformers_inference(grid_hw, head_dim):
    patch = 4
    cfg = DINOv3ViTConfig(hidden_size=head_dim * 2, num_attention_heads=2, patch_size=patch, rope_theta=100.0)
    rope = hf_dinov3.DINOv3ViTRopePositionEmbedding(cfg).eval()
    pixels = torch.zeros(1, 3, grid_hw[0] * patch, grid_hw[1] * patch)
    cos_ref, sin_ref = rope(pixels)
    cos, sin = rope_lib.rope_2d(grid_hw, head_dim, theta=100.0)
    assert cos.shape == (grid_hw[0] * grid_hw[1], head_dim)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=2e-6)


def _numpy_rope_from_coords(coords: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(head_dim // 4) * 4 / head_dim)
    angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]
    angles = np.tile(angles.reshape(coords.shape[0], -1), (1, 2))
    return np.cos(angles), np.sin(angles)


def test_rope_2d_rescale_augmentation():
    """Train mode: one log-uniform factor in [1/2, 2] multiplies both axes; the torch module's train-mode
    output has the same shape; a given rng is deterministic, different rngs differ, no rng = no change."""
    grid_hw, head_dim = (2, 4), 16  # even grid sizes: no patch centre at 0, so coordinate ratios exist
    cfg = DINOv3ViTConfig(hidden_size=32, num_attention_heads=2, patch_size=4, pos_embed_rescale=2.0)
    cos_ref_train, _ = hf_dinov3.DINOv3ViTRopePositionEmbedding(cfg).train()(torch.zeros(1, 3, 8, 16))

    coords = np.asarray(rope_lib.patch_center_coords(*grid_hw))
    aug = rope_lib.RopeAugmentation(rescale=2.0)
    scaled = np.asarray(aug(jnp.asarray(coords), jax.random.key(3)))
    factor = scaled / coords
    assert np.allclose(factor, factor.flat[0], rtol=1e-5)  # one factor for both axes and every patch
    assert 0.5 <= factor.flat[0] <= 2.0 and not np.isclose(factor.flat[0], 1.0)

    cos, sin = rope_lib.rope_2d(grid_hw, head_dim, augmentation=aug, rng=jax.random.key(3))
    assert cos.shape == tuple(cos_ref_train.shape)
    cos_np, sin_np = _numpy_rope_from_coords(scaled, head_dim, 100.0)
    np.testing.assert_allclose(np.asarray(cos), cos_np, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_np, atol=2e-6)

    again, _ = rope_lib.rope_2d(grid_hw, head_dim, augmentation=aug, rng=jax.random.key(3))
    other, _ = rope_lib.rope_2d(grid_hw, head_dim, augmentation=aug, rng=jax.random.key(4))
    plain, _ = rope_lib.rope_2d(grid_hw, head_dim, augmentation=aug, rng=None)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(cos))
    assert not np.allclose(np.asarray(other), np.asarray(cos))
    np.testing.assert_allclose(np.asarray(plain), _numpy_rope_from_coords(coords, head_dim, 100.0)[0], atol=2e-6)


def test_rope_shift_and_jitter_are_per_axis():
    coords = rope_lib.patch_center_coords(2, 4)
    shifted = np.asarray(rope_lib.RopeAugmentation(shift=0.5, rescale=None)(coords, jax.random.key(0)))
    delta = shifted - np.asarray(coords)
    assert np.allclose(delta, delta[:1]) and np.all(np.abs(delta) <= 0.5) and not np.isclose(delta[0, 0], delta[0, 1])
    jittered = np.asarray(rope_lib.RopeAugmentation(jitter=2.0, rescale=None)(coords, jax.random.key(0)))
    ratio = jittered / np.asarray(coords)
    assert np.allclose(ratio, ratio[:1], rtol=1e-5) and not np.isclose(ratio[0, 0], ratio[0, 1])


def test_apply_rope_2d_matches_transformers_and_leaves_prefix():
    rng = np.random.default_rng(0)
    b, prefix, n, h, hd = 2, 3, 6, 2, 16
    q = rng.normal(size=(b, prefix + n, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, prefix + n, h, hd)).astype(np.float32)
    cos, sin = rope_lib.rope_2d((2, 3), hd)
    q_ref, k_ref = hf_dinov3.apply_rotary_pos_emb(
        _t(q).transpose(1, 2), _t(k).transpose(1, 2), _t(cos), _t(sin))
    np.testing.assert_allclose(np.asarray(rope_lib.apply_rope_2d(jnp.asarray(q), cos, sin)),
                               q_ref.transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rope_lib.apply_rope_2d(jnp.asarray(k), cos, sin)),
                               k_ref.transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(rope_lib.apply_rope_2d(jnp.asarray(q), cos, sin))[:, :prefix],
                                  q[:, :prefix])


def _official_apply_rope_axis_numpy(x: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Direct numpy transcription of the official predictor's `_apply_rope_axis` (x: [B, H, L, size],
    position: [B, H, L, 1]): rotate-half over size//2 pairs, inv_freq = 1/10**linspace(-2, 2, half)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10.0 ** np.linspace(-2, 2, half))
    even, odd = x[..., :half], x[..., half : 2 * half]
    angle = 2 * np.pi * position * inv_freq.reshape(1, 1, 1, half)
    return np.concatenate([even * np.cos(angle) - odd * np.sin(angle), even * np.sin(angle) + odd * np.cos(angle)], -1)


def _official_apply_rope_numpy(x_bhld, positions, axis_sizes, unrotated):
    parts, offset = [], 0
    for pos, size in zip(positions, axis_sizes):
        parts.append(_official_apply_rope_axis_numpy(x_bhld[..., offset : offset + size], pos))
        offset += size
    parts.append(x_bhld[..., offset : offset + unrotated])
    return np.concatenate(parts, -1)


@pytest.mark.parametrize("axis_sizes,unrotated", [((60,), 4), ((20, 20, 20), 4), ((6, 4), 2)])
def test_apply_axis_rope_matches_official_semantics(axis_sizes, unrotated):
    rng = np.random.default_rng(1)
    b, l, h = 2, 5, 2
    hd = sum(axis_sizes) + unrotated
    x = rng.normal(size=(b, l, h, hd)).astype(np.float32)
    positions = tuple(rng.uniform(-3, 3, size=(b, l)).astype(np.float32) for _ in axis_sizes)
    ours = rope_lib.apply_axis_rope(jnp.asarray(x), tuple(map(jnp.asarray, positions)), axis_sizes, unrotated)
    # Official layout: [B, H, L, hd] with positions expanded to [B, H, L, 1]. The reference runs in float64;
    # angles reach 2*pi*3*100 rad, where one float32 ulp of inv_freq (torch's and ours differ by one) moves the
    # angle by ~5e-4 rad, so the tolerance is 1e-3 (a layout or frequency error is O(1)).
    expanded = [np.broadcast_to(p[:, None, :, None], (b, h, l, 1)).astype(np.float64) for p in positions]
    ref = _official_apply_rope_numpy(x.transpose(0, 2, 1, 3).astype(np.float64), expanded, axis_sizes, unrotated)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 1, 3), atol=1e-3)
    # Small positions (small angles): float32 rounding is negligible, so the match must be tight.
    small = tuple(p * 1e-3 for p in positions)
    ours_small = rope_lib.apply_axis_rope(jnp.asarray(x), tuple(map(jnp.asarray, small)), axis_sizes, unrotated)
    expanded = [np.broadcast_to(p[:, None, :, None], (b, h, l, 1)).astype(np.float64) for p in small]
    ref = _official_apply_rope_numpy(x.transpose(0, 2, 1, 3).astype(np.float64), expanded, axis_sizes, unrotated)
    np.testing.assert_allclose(np.asarray(ours_small), ref.transpose(0, 2, 1, 3), atol=2e-5)


def test_apply_axis_rope_rejects_wrong_number_of_positions():
    x = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="2 RoPE axes"):
        rope_lib.apply_axis_rope(x, (jnp.zeros((1, 2)),), (4, 4), 0)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


def test_dot_product_attention_xla_matches_reference_with_mask():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, s, 3, 8)).astype(np.float32)) for s in (4, 6, 6))
    mask = jnp.asarray(rng.uniform(size=(2, 1, 4, 6)) > 0.3).at[..., 0].set(True)
    xla = attention.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    ref = attention.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=1e-5)
    # And against torch's sdpa (boolean mask, True = attend).
    torch_out = torch.nn.functional.scaled_dot_product_attention(
        *(_t(a).transpose(1, 2) for a in (q, k, v)), attn_mask=torch.from_numpy(np.array(mask)))
    np.testing.assert_allclose(np.asarray(ref), torch_out.transpose(1, 2).numpy(), atol=1e-5)


def _torch_self_attention(x, p, num_heads, cos, sin, qk_norm, gate, eps=1e-5):
    """Reference written from the official DeltaTok attention (qk_norm.py / gated_attn.py semantics):
    project, RoPE on the last N tokens, bias-free LayerNorm over head_dim AFTER RoPE, sdpa, per-head
    sigmoid gate from the attention input, o_proj."""
    b, l, d = x.shape
    hd = d // num_heads

    def heads(t):
        return t.view(b, l, num_heads, hd).transpose(1, 2)

    q, k, v = (heads(torch.nn.functional.linear(x, p[f"{n}.w"], p.get(f"{n}.b"))) for n in "qkv")
    q, k = hf_dinov3.apply_rotary_pos_emb(q, k, cos, sin)
    if qk_norm:
        q = torch.nn.functional.layer_norm(q, (hd,), p["qn.w"], None, eps)
        k = torch.nn.functional.layer_norm(k, (hd,), p["kn.w"], None, eps)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if gate:
        g = torch.nn.functional.linear(x, p["g.w"], p["g.b"]).transpose(1, 2).unsqueeze(-1).sigmoid()
        out = out * g
    return torch.nn.functional.linear(out.transpose(1, 2).reshape(b, l, d), p["o.w"], p["o.b"])


@pytest.mark.parametrize("qk_norm,gate", [(True, True), (False, False)])
def test_self_attention_matches_torch_reference(qk_norm, gate):
    d, heads, prefix, grid = 32, 2, 1, (2, 3)
    cfg = blocks.AttentionConfig(d, heads, qk_norm=qk_norm, output_gate=gate, implementation="xla")
    attn = blocks.SelfAttention(cfg, rngs=nnx.Rngs(0))
    _randomise(attn, seed=5, scale=0.3)
    x = np.random.default_rng(3).normal(size=(2, prefix + 6, d)).astype(np.float32)
    cos, sin = rope_lib.rope_2d(grid, d // heads)
    ours = attn(jnp.asarray(x), (cos, sin))

    p = {"q.w": attn.q_proj.kernel, "q.b": attn.q_proj.bias, "k.w": attn.k_proj.kernel,
         "v.w": attn.v_proj.kernel, "v.b": attn.v_proj.bias, "o.w": attn.o_proj.kernel, "o.b": attn.o_proj.bias}
    assert attn.k_proj.bias is None  # DINOv3: key projection without bias
    if qk_norm:
        p |= {"qn.w": attn.q_norm.weight, "kn.w": attn.k_norm.weight}
    if gate:
        p |= {"g.w": attn.attn_gate.kernel, "g.b": attn.attn_gate.bias}
    p = {n: _t(v.get_value()).T if n.endswith(".w") and v.get_value().ndim == 2 else _t(v.get_value())
         for n, v in p.items()}
    ref = _torch_self_attention(_t(x), p, heads, _t(cos), _t(sin), qk_norm, gate)
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=3e-5, rtol=1e-4)


def test_self_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible"):
        blocks.SelfAttention(blocks.AttentionConfig(30, 4), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------------
# MLPs, norms, block
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_mlps_match_transformers(gated):
    d, inter = 16, 24
    cfg = DINOv3ViTConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=2,
                          hidden_act="silu" if gated else "gelu")
    if gated:
        ours, theirs = basic_layers.GatedMLP(d, inter, act="silu", rngs=nnx.Rngs(0)), hf_dinov3.DINOv3ViTGatedMLP(cfg)
    else:
        ours, theirs = basic_layers.MLP(d, inter, act="gelu", rngs=nnx.Rngs(0)), hf_dinov3.DINOv3ViTMLP(cfg)
    _randomise(ours, seed=7)
    for name in ("up_proj", "down_proj") + (("gate_proj",) if gated else ()):
        _copy_linear(getattr(ours, name), getattr(theirs, name))
    x = np.random.default_rng(4).normal(size=(2, 5, d)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), theirs(_t(x)).detach().numpy(), atol=2e-5, rtol=1e-5)


def test_layer_norm_matches_torch_and_returns_compute_dtype():
    norm = basic_layers.LayerNorm(8, eps=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _randomise(norm, seed=8)
    x = np.random.default_rng(5).normal(3.0, 2.0, size=(3, 8)).astype(np.float32)
    ref = torch.nn.functional.layer_norm(_t(x), (8,), _t(norm.weight.get_value()), _t(norm.bias.get_value()), 1e-5)
    out = norm(jnp.asarray(x))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref.numpy(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_gradients_match_torch(use_bias):
    """LayerNorm's hand-written gradient (basic_layers.layer_norm_f32) against torch's autograd: input, weight and bias,
    with and without bias (DeltaTok's QK-norm), on inputs with a large mean and leading batch axes."""
    norm = basic_layers.LayerNorm(16, eps=1e-5, use_bias=use_bias, rngs=nnx.Rngs(0))
    _randomise(norm, seed=9)
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, size=(2, 5, 16)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)

    def loss(module, inputs):
        return jnp.sum(module(inputs) * dy)

    grad_norm, grad_x = nnx.grad(loss, argnums=(0, 1))(norm, jnp.asarray(x))
    xt = _t(x).requires_grad_()
    wt = _t(norm.weight.get_value()).requires_grad_()
    bt = _t(norm.bias.get_value()).requires_grad_() if use_bias else None
    (torch.nn.functional.layer_norm(xt, (16,), wt, bt, 1e-5) * _t(dy)).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_x), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(grad_norm.weight.get_value()), wt.grad.numpy(), **tol)
    if use_bias:
        np.testing.assert_allclose(np.asarray(grad_norm.bias.get_value()), bt.grad.numpy(), **tol)


def test_count_params_counts_abstract_modules():
    mlp = nnx.eval_shape(lambda: basic_layers.MLP(4, 8, rngs=nnx.Rngs(0)))
    assert basic_layers.count_params(mlp) == 4 * 8 + 8 + 8 * 4 + 4
