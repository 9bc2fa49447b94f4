"""Loading released DeltaWorld / DINO-World weights: official-named tensors built with torch modules that
mirror the official module tree, saved as pytorch_model.bin or a Lightning .ckpt, loaded and compared
parameter by parameter; sizes inferred from shapes; strict errors list every problem at once."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from deltaworld_jax.pretrained import load_deltaworld, load_dinoworld
from deltaworld_jax.pretrained.common import CheckpointMismatchError
from deltaworld_jax.pretrained.world import world_state_dict


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.randn(dim))


class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)


class _CrossAttn(nn.Module):
    def __init__(self, backbone, dim):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(backbone, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)


class _Block(nn.Module):
    def __init__(self, backbone, dim, ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = _CrossAttn(backbone, dim)
        self.layer_scale1, self.layer_scale2 = _LayerScale(dim), _LayerScale(dim)
        self.mlp = _MLP(dim, dim * ratio)


class _Predictor(nn.Module):
    def __init__(self, backbone, dim, depth, ratio):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(backbone, dim, ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, backbone)


class _World(nn.Module):
    """The official World's trained parameters: `predictor` (+ `q_embed` for the deterministic variant)."""

    def __init__(self, backbone=24, dim=32, depth=2, ratio=3, q_embed=False):
        super().__init__()
        torch.manual_seed(0)
        self.predictor = _Predictor(backbone, dim, depth, ratio)
        if q_embed:
            self.q_embed = nn.Embedding(1, dim)
        with torch.no_grad():  # non-default values everywhere, so a wrong mapping cannot pass
            for p in self.parameters():
                p.copy_(torch.randn_like(p))


def assert_same_params(model, official: nn.Module):
    ours = world_state_dict(model)
    theirs = {k: v.detach().numpy() for k, v in official.state_dict().items()}
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_deltaworld_from_pytorch_model_bin(tmp_path):
    official = _World()
    path = tmp_path / "pytorch_model.bin"
    torch.save(official.state_dict(), path)
    model = load_deltaworld(path, num_heads=2, rope_axis_sizes=(12,))
    cfg = model.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.backbone_hidden_size, cfg.mlp_ratio) == (32, 2, 24, 3)
    assert cfg.use_bom and cfg.rope_axis_sizes == (12,) and cfg.num_samples_eval == 20
    assert_same_params(model, official)


def test_lightning_ckpt_with_network_prefix_drops_frozen_parts(tmp_path):
    official = _World()
    state = {f"network.{k}": v for k, v in official.state_dict().items()}
    state["network.tokenizer.z_embed.weight"] = torch.zeros(1, 24)  # frozen parts: ignored
    state["network.backbone.backbone.norm.weight"] = torch.zeros(24)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, path)
    assert_same_params(load_deltaworld(path, num_heads=2, rope_axis_sizes=(12,)), official)


def test_dinoworld_with_q_embed(tmp_path):
    official = _World(q_embed=True)
    path = tmp_path / "pytorch_model.bin"
    torch.save(official.state_dict(), path)
    model = load_dinoworld(path, num_heads=2, rope_axis_sizes=(4, 4, 4))
    assert not model.cfg.use_bom and model.cfg.rope_axis_sizes == (4, 4, 4)
    assert_same_params(model, official)


def test_missing_and_unused_keys_in_one_error(tmp_path):
    state = _World().state_dict()
    del state["predictor.blocks.1.attention.q_proj.bias"]
    state["predictor.blocks.0.attention.k_norm.weight"] = torch.zeros(16)
    state["predictor.head.bias"] = torch.zeros(25)
    with pytest.raises(CheckpointMismatchError) as info:
        load_deltaworld(dict(state), num_heads=2, rope_axis_sizes=(12,))
    message = str(info.value)
    for part in ("blocks.1.attention.q_proj.bias", "k_norm.weight", "head.bias", "(25,)"):
        assert part in message, message


def test_bad_sizes_are_named():
    state = _World().state_dict()
    with pytest.raises(ValueError, match="head_dim"):
        load_deltaworld(dict(state), num_heads=2)  # released RoPE split (60,) + 4 does not fit head_dim 16

    class _Tokenizer:
        class cfg:
            hidden_size = 48

    with pytest.raises(ValueError, match="48-wide tokens"):
        load_deltaworld(dict(state), tokenizer=_Tokenizer(), num_heads=2, rope_axis_sizes=(12,))
    with pytest.raises(ValueError, match="not a DeltaWorld"):
        load_deltaworld({"foo.weight": np.zeros(3)})
