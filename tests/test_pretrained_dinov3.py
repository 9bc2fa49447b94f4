"""DINOv3 weight import and the shared strict-loading utilities (pretrained/common.py): every source format and
key layout in the wild loads the same parameters; every mismatch is reported at once; the hub fails cleanly
offline; `build_vfm`. Compares parameter trees (no forward passes: parity lives in test_dinov3.py)."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from deltaworld_jax.models.dinov3 import PRESETS, DINOv3, DINOv3Config, PixelPatchVFM
from deltaworld_jax.pretrained import build_vfm, common, load_dinov3
from deltaworld_jax.pretrained.dinov3 import HubDownloadError

CONFIGS = {
    "registers": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      patch_size=8, num_register_tokens=4),
    "swiglu": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=16, num_register_tokens=1, use_gated_mlp=True, hidden_act="silu"),
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{name: (folder saved by transformers, its state dict as numpy)}; biases randomised so that a zero
    default cannot hide a dropped tensor."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = DINOv3ViTModel(DINOv3ViTConfig(**cfg)).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname or "lambda1" in pname:
                    p.add_(torch.randn_like(p) * 0.1)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (str(folder), {k: v.numpy() for k, v in model.state_dict().items()})
    return out


def _params(model) -> dict[str, np.ndarray]:
    _, state = nnx.split(model)
    return {common.path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_hf_folder_loads_every_tensor_with_transposes(hf_folders):
    folder, sd = hf_folders["registers"]
    model = load_dinov3(folder)
    p = _params(model)
    assert "model.layer.0.attention.q_proj.weight" in sd  # transformers >= 5 layout
    np.testing.assert_array_equal(p["layer.1.attention.q_proj.kernel"], sd["model.layer.1.attention.q_proj.weight"].T)
    np.testing.assert_array_equal(p["embeddings.patch_embeddings.kernel"],
                                  sd["embeddings.patch_embeddings.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer.0.layer_scale2.lambda1"], sd["model.layer.0.layer_scale2.lambda1"])
    np.testing.assert_array_equal(p["norm.bias"], sd["norm.bias"])
    assert "layer.0.attention.k_proj.bias" not in p
    # Everything but the (dropped) mask token becomes a parameter.
    assert sum(v.size for v in p.values()) == sum(v.size for k, v in sd.items() if k != "embeddings.mask_token")
    assert model.config.attention_impl == "xla" and model.num_heads == 4 and model.patch_size == 8


def test_state_dict_files_in_both_layouts_and_wrapped(hf_folders, tmp_path):
    folder, sd = hf_folders["registers"]
    reference = load_dinov3(folder)

    new_layout = tmp_path / "new.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, new_layout)
    with pytest.raises(ValueError, match="not a released DINOv3 width; pass num_heads"):
        load_dinov3(new_layout)
    _assert_same_params(load_dinov3(new_layout, num_heads=4), reference)

    old_layout = tmp_path / "pytorch_model.bin"  # transformers 4.x: layer.N... without "model."
    torch.save({k.removeprefix("model."): torch.from_numpy(v) for k, v in sd.items()}, old_layout)
    _assert_same_params(load_dinov3(old_layout, num_heads=4), reference)

    lightning = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, lightning)
    _assert_same_params(load_dinov3(lightning, num_heads=4, prefix="backbone."), reference)
    config = DINOv3Config.from_hf_config(json.loads((tmp_path.parent / folder / "config.json").read_text()))
    _assert_same_params(load_dinov3(lightning, config=config, prefix="backbone."), reference)


def _to_meta_layout(sd: dict[str, np.ndarray], head_dim: int) -> dict[str, np.ndarray]:
    """The transformers state dict written back in Meta's original DINOv3 layout (fused qkv with a masked,
    zero key bias; storage_tokens; ls1.gamma; fc1/fc2 or w1/w2/w3; RoPE periods buffer)."""
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0], "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"], "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"],
           "rope_embed.periods": (100.0 ** (np.arange(head_dim // 4) * 4 / head_dim)).astype(np.float32)}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layer."))
    gated = "model.layer.0.mlp.gate_proj.weight" in sd
    mlp_names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
    for i in range(n):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        q, k, v = (sd[f"{src}attention.{x}_proj.weight"] for x in "qkv")
        out[dst + "attn.qkv.weight"] = np.concatenate([q, k, v])
        qb, vb = sd[src + "attention.q_proj.bias"], sd[src + "attention.v_proj.bias"]
        out[dst + "attn.qkv.bias"] = np.concatenate([qb, np.full_like(qb, 7.0), vb])  # masked out below
        out[dst + "attn.qkv.bias_mask"] = np.concatenate([np.ones_like(qb), np.zeros_like(qb), np.ones_like(vb)])
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.proj.{leaf}"] = sd[f"{src}attention.o_proj.{leaf}"]
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.{leaf}"] = sd[f"{src}{norm}.{leaf}"]
            for ours, theirs in mlp_names.items():
                out[f"{dst}mlp.{theirs}.{leaf}"] = sd[f"{src}mlp.{ours}.{leaf}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_original_layout(hf_folders, tmp_path, name):
    folder, sd = hf_folders[name]
    meta = _to_meta_layout(sd, head_dim=16)
    path = tmp_path / "dinov3_original.safetensors"
    save_file(meta, str(path))
    model = load_dinov3(path)  # heads from the RoPE periods, the rest from shapes
    assert model.config.use_gated_mlp == (name == "swiglu") and model.num_heads == 4
    _assert_same_params(model, load_dinov3(folder))

    periods = meta["rope_embed.periods"].copy()
    meta["rope_embed.periods"] = periods * 2  # another RoPE base than rope_theta 100
    save_file(meta, str(path))
    with pytest.raises(common.CheckpointMismatchError, match="rope_embed.periods"):
        load_dinov3(path)
    meta["rope_embed.periods"] = periods

    block0 = "blocks.0.attn.qkv.bias_mask"
    meta[block0] = np.ones_like(meta[block0])  # key bias no longer masked: this model cannot represent it
    save_file(meta, str(path))
    with pytest.raises(common.CheckpointMismatchError, match="non-zero key bias"):
        load_dinov3(path)


def test_every_mismatch_is_reported_in_one_error(hf_folders, tmp_path):
    folder, sd = hf_folders["registers"]
    broken = {k: v for k, v in sd.items() if k not in ("norm.weight", "model.layer.1.mlp.up_proj.bias")}
    broken["model.layer.0.attention.extra_proj.weight"] = np.zeros((64, 64), np.float32)
    broken["decoder.head.weight"] = np.zeros((3,), np.float32)
    broken["model.layer.0.attention.q_proj.weight"] = np.zeros((64, 32), np.float32)
    (tmp_path / "config.json").write_text((tmp_path.parent / folder / "config.json").read_text())
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(common.CheckpointMismatchError) as info:
        load_dinov3(tmp_path)
    message = str(info.value)
    for expected in ("2 unused checkpoint entries", "model.layer.0.attention.extra_proj.weight", "decoder.head.weight",
                     "2 missing model parameters", "norm.weight", "layer.1.mlp.up_proj.bias",
                     "1 shape mismatches", "model.layer.0.attention.q_proj.weight (-> layer.0.attention.q_proj.kernel): "
                     "checkpoint (32, 64) vs model (64, 64)"):
        assert expected in message, (expected, message)


def test_unknown_hub_id_offline_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo_id in ("facebook/dinov3-vitb16-pretrain-lvd1689m", "nobody/no-such-dinov3"):
        with pytest.raises(HubDownloadError) as info:
            load_dinov3(repo_id, revision="0" * 40)  # a revision that no local cache holds
        assert repo_id in str(info.value) and "offline" in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained hub traceback
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_dinov3(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_dinov3("weights/missing.pth")  # relative, owner/name-shaped, but a file name: not a hub id


def test_read_state_dict_formats(hf_folders, tmp_path, monkeypatch):
    folder, sd = hf_folders["swiglu"]
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for shard, shard_keys in halves.items():
        save_file({k: sd[k] for k in shard_keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = common.read_state_dict(tmp_path)
    assert sharded.keys() == sd.keys() and all(np.array_equal(sharded[k], sd[k]) for k in sd)

    with pytest.raises(ValueError, match="unknown checkpoint format '.npz'"):
        (tmp_path / "w.npz").write_bytes(b"")
        common.read_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        common.read_state_dict(tmp_path / "empty")

    torch.save({"a": torch.zeros(2)}, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="needs `torch`"):
        common.read_state_dict(tmp_path / "w.pth")
    assert common.read_state_dict(tmp_path / "model-00001-of-00002.safetensors").keys() == set(
        halves["model-00001-of-00002.safetensors"])


def test_layout_helpers_match_torch():
    rng = np.random.default_rng(0)
    linear = torch.nn.Linear(5, 3)
    x = rng.normal(size=(2, 5)).astype(np.float32)
    kernel = common.torch_linear_to_kernel(linear.weight.detach().numpy())
    np.testing.assert_allclose(x @ kernel + linear.bias.detach().numpy(),
                               linear(torch.from_numpy(x)).detach().numpy(), atol=1e-6)

    conv = torch.nn.Conv2d(3, 4, kernel_size=2, stride=2)
    kernel = common.torch_conv_to_kernel(conv.weight.detach().numpy())  # HWIO, as nnx.Conv keeps it
    img = rng.normal(size=(1, 4, 6, 3)).astype(np.float32)  # NHWC
    ours = jax.lax.conv_general_dilated(img, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = conv(torch.from_numpy(img).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours) + conv.bias.detach().numpy(), ref, atol=1e-5)

    assert common.strip_prefix({"backbone.a": 1, "b": 2}, "backbone.") == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="2-D"):
        common.torch_linear_to_kernel(np.zeros(3))


def test_param_dtype_compute_dtype_and_placement(hf_folders):
    device = jax.devices()[-1]
    placed = []

    def sharding_for(path, variable):
        placed.append((path, tuple(variable.get_metadata().get("out_sharding") or ())))
        return jax.sharding.SingleDeviceSharding(device)

    model = load_dinov3(hf_folders["registers"][0], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        attention_impl=None, sharding_for=sharding_for)
    assert all(v.dtype == jnp.bfloat16 for v in _params(model).values())
    assert model.dtype == jnp.bfloat16 and model.config.attention_impl is None
    assert model.layer[0].mlp.up_proj.kernel.get_value().sharding == jax.sharding.SingleDeviceSharding(device)
    axes = dict(placed)  # the logical axis names travel with the abstract variables
    assert axes["layer.0.mlp.up_proj.kernel"] == ("embed", "mlp") and axes["embeddings.cls_token"][-1] == "embed"


def test_build_vfm(hf_folders, monkeypatch):
    pixel = build_vfm(ml_collections.ConfigDict(dict(kind="pixel", patch_size=8, num_heads=0, dtype="bfloat16")))
    assert isinstance(pixel, PixelPatchVFM) and (pixel.hidden_size, pixel.num_heads, pixel.dtype) == (
        192, 3, jnp.bfloat16)
    loaded = build_vfm(ml_collections.ConfigDict(
        dict(kind="dinov3", preset="vitb16", weights=hf_folders["swiglu"][0], dtype="float32")))
    assert isinstance(loaded, DINOv3) and loaded.hidden_size == 64 and loaded.config.use_gated_mlp  # weights win
    monkeypatch.setitem(PRESETS, "tiny", DINOv3Config(hidden_size=16, num_layers=1, num_heads=2,
                                                      intermediate_size=16, num_register_tokens=1, patch_size=4))
    random_init = build_vfm({"kind": "dinov3", "preset": "tiny", "weights": "", "dtype": "bf16"})
    assert random_init.hidden_size == 16 and random_init.dtype == jnp.bfloat16
    assert float(jnp.std(random_init.layer[0].mlp.up_proj.kernel.get_value())) > 0.01  # really initialised
    with pytest.raises(ValueError, match="unknown vfm kind"):
        build_vfm({"kind": "clip"})
    with pytest.raises(ValueError, match="unknown dtype"):
        build_vfm({"kind": "pixel", "dtype": "float8"})
