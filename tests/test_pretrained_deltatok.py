"""Import of official DeltaTok checkpoints: .bin, Lightning .ckpt (network. prefix + frozen backbone keys),
.safetensors; sizes inferred from the tensors; every JAX parameter equals its tensor (Linear transposed);
a bad checkpoint fails with ONE error that lists every problem."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from deltaworld_jax.pretrained import common
from deltaworld_jax.pretrained.deltatok import load_deltatok

torch = pytest.importorskip("torch")
transformers_dinov3 = pytest.importorskip("transformers.models.dinov3_vit.modeling_dinov3_vit")

HIDDEN, HEADS, DEPTH, MLP = 32, 4, 2, 64


def official_tree(use_qk_norm=True, use_gated_attn=True, use_swiglu=True) -> torch.nn.Module:
    """The official module tree (names and shapes only; forward is not needed here)."""
    cfg = transformers_dinov3.DINOv3ViTConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=MLP, key_bias=False,
        use_gated_mlp=use_swiglu, hidden_act="silu" if use_swiglu else "gelu", layerscale_value=1e-5)
    root = torch.nn.Module()
    root.z_embed = torch.nn.Embedding(1, HIDDEN)
    root.xy_embed = torch.nn.Embedding(2, HIDDEN)
    for stack in ("encoder_blocks", "decoder_blocks"):
        blocks = torch.nn.ModuleList([transformers_dinov3.DINOv3ViTLayer(cfg) for _ in range(DEPTH)])
        for blk in blocks:
            if use_qk_norm:
                blk.attention.q_norm = torch.nn.LayerNorm(HIDDEN // HEADS, bias=False)
                blk.attention.k_norm = torch.nn.LayerNorm(HIDDEN // HEADS, bias=False)
            if use_gated_attn:
                blk.attention.attn_gate = torch.nn.Linear(HIDDEN, HEADS, bias=True)
        setattr(root, stack, blocks)
    root.norm = torch.nn.LayerNorm(HIDDEN)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in root.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))  # distinct values everywhere, so mix-ups show
    return root


def assert_params_equal_tensors(model, sd: dict[str, torch.Tensor]) -> None:
    flat = {common.path_to_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(flat) == len(sd)
    for path, value in flat.items():
        if path.endswith(".kernel"):
            tensor = sd[path[: -len("kernel")] + "weight"].numpy().T  # torch Linear keeps [out, in]
        else:
            tensor = sd[path].numpy()
        np.testing.assert_array_equal(value, tensor, err_msg=path)


def test_bin_ckpt_and_safetensors_load_to_the_same_parameters(tmp_path):
    from safetensors.torch import save_file

    tree = official_tree()
    sd = tree.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    backbone = {"backbone.backbone.norm.weight": torch.ones(7), "backbone.backbone.layer.0.mlp.up_proj.weight":
                torch.ones(3, 7)}
    lightning = {"state_dict": {**{f"network.{k}": v for k, v in sd.items()},
                                **{f"network.{k}": v for k, v in backbone.items()}},
                 "epoch": 3, "global_step": 1000}
    torch.save(lightning, tmp_path / "last.ckpt")
    # The official on_save_checkpoint writes the network's trainable keys without any prefix.
    torch.save({"state_dict": dict(sd), "global_step": 5}, tmp_path / "official.ckpt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))

    for name in ("pytorch_model.bin", "last.ckpt", "official.ckpt", "model.safetensors"):
        model = load_deltatok(tmp_path / name)
        cfg = model.cfg
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (HIDDEN, DEPTH, HEADS, MLP)
        assert cfg.use_qk_norm and cfg.use_gated_attn and cfg.use_swiglu and cfg.use_delta
        assert_params_equal_tensors(model, sd)


def test_switches_and_heads_are_inferred_from_key_presence():
    sd = official_tree(use_qk_norm=True, use_gated_attn=False, use_swiglu=False).state_dict()
    model = load_deltatok({k: v.numpy() for k, v in sd.items()})
    assert (model.cfg.num_heads, model.cfg.use_qk_norm, model.cfg.use_gated_attn, model.cfg.use_swiglu) == (
        HEADS, True, False, False)
    assert_params_equal_tensors(model, sd)

    plain = {k: v.numpy() for k, v in official_tree(False, False, False).state_dict().items()}
    with pytest.raises(ValueError, match="num_heads"):
        load_deltatok(plain)  # nothing per-head in the tensors: the caller must say
    assert load_deltatok(plain, num_heads=2).cfg.num_heads == 2


def test_missing_unused_and_mismatched_keys_are_reported_together():
    sd = {k: v.numpy() for k, v in official_tree().state_dict().items()}
    del sd["decoder_blocks.1.mlp.down_proj.bias"]
    del sd["encoder_blocks.0.attention.k_norm.weight"]
    sd["encoder_blocks.0.attention.extra_proj.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
    sd["decoder_blocks.0.layer_scale1.lambda1"] = np.zeros((HIDDEN + 1,), np.float32)
    with pytest.raises(common.CheckpointMismatchError) as err:
        load_deltatok(sd)
    message = str(err.value)
    for key in ("decoder_blocks.1.mlp.down_proj.bias", "encoder_blocks.0.attention.k_norm.weight",
                "encoder_blocks.0.attention.extra_proj.weight", "decoder_blocks.0.layer_scale1.lambda1"):
        assert key in message, (key, message)


def test_vfm_width_is_checked():
    from deltaworld_jax.models.dinov3 import PixelPatchVFM

    sd = {k: v.numpy() for k, v in official_tree().state_dict().items()}
    with pytest.raises(ValueError, match="hidden_size"):
        load_deltatok(sd, vfm=PixelPatchVFM(patch_size=4))  # width 48 != 32
    with pytest.raises(ValueError, match="Not a DeltaTok checkpoint"):
        load_deltatok({"layer.0.norm1.weight": np.ones(3)})
