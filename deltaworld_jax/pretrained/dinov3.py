"""Import of DINOv3 ViT weights, and `build_vfm` (the VFM from a config).

Sources: a Hugging Face folder (config.json + safetensors or pytorch_model.bin), a single checkpoint file
(.safetensors/.bin/.pth/.pt/.ckpt), or a hub id such as `facebook/dinov3-vitb16-pretrain-lvd1689m` (then
downloaded with huggingface_hub when there is network; the DINOv3 repositories are gated, so a token of an
account that accepted the licence is needed).

Key layouts accepted:
  * `transformers` >= 5 (`model.layer.N...`) and older (`layer.N...`), plus `embeddings...` and `norm...`;
  * Meta's original release (`blocks.N.attn.qkv...`, `storage_tokens`, `patch_embed.proj...`, `ls1.gamma`),
    as in the `dinov3_vitb16_pretrain_lvd1689m-*.pth` files.
The mask token (masked pre-training only) and RoPE buffers (recomputed) are dropped on purpose; any other
checkpoint key that does not map onto the model is an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.dinov3 import PRESETS, DINOv3, DINOv3Config, PixelPatchVFM
from deltaworld_jax.pretrained import common

# Keys that exist in released checkpoints but carry nothing the feature extractor uses.
_DROPPED = re.compile(r"embeddings\.mask_token|mask_token|rope_embeddings\.inv_freq|rope_embed\.periods")

# Heads of the released models by width: the HF layout has no per-head tensor to read it from.
_RELEASED_HEADS = {cfg.hidden_size: cfg.num_heads for cfg in PRESETS.values()}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")  # "dir/w.pth" is a path, not an id


class HubDownloadError(OSError):
    """The weights could not be fetched from the Hugging Face Hub (offline, gated, unknown id, ...)."""


# ----------------------------------------------------------------------------------------------------
# Key conversion
# ----------------------------------------------------------------------------------------------------


def _is_meta_layout(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(("blocks.", "patch_embed.")) for k in state)


def _weight_and_bias(official: str, ours: str) -> tuple[common.Rule, common.Rule]:
    """A torch Linear module's two rules: `weight` [out, in] -> our `kernel` [in, out], `bias` as is."""
    return (common.Rule(official + ".weight", ours + ".kernel", "linear"),
            common.Rule(official + ".bias", ours + ".bias"))


# `transformers` DINOv3ViTModel: >= 5 puts the layers under `model.`, older versions do not.
_HF_LAYER = "{model:(?:model\\.)?}layer.{i}."
HF_TABLE: tuple[common.Rule, ...] = (
    *_weight_and_bias(_HF_LAYER + "{linear:attention.q_proj|attention.k_proj|attention.v_proj|attention.o_proj|"
                      "mlp.up_proj|mlp.down_proj|mlp.gate_proj}", "layer.{i}.{linear}"),
    common.Rule(_HF_LAYER + "{vector:norm1.weight|norm1.bias|norm2.weight|norm2.bias|layer_scale1.lambda1|"
                "layer_scale2.lambda1}", "layer.{i}.{vector}"),
    common.Rule("{name:embeddings.cls_token|embeddings.register_tokens|norm.weight|norm.bias}", "{name}"),
    common.Rule("embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.kernel", "conv"),
    common.Rule("embeddings.patch_embeddings.bias", "embeddings.patch_embeddings.bias"),
)

# Meta's original release, after _split_fused_qkv. SwiGLU is w3(silu(w1 x) * w2 x).
META_TABLE: tuple[common.Rule, ...] = (
    common.Rule("cls_token", "embeddings.cls_token"),
    common.Rule("storage_tokens", "embeddings.register_tokens"),
    common.Rule("patch_embed.proj.weight", "embeddings.patch_embeddings.kernel", "conv"),
    common.Rule("patch_embed.proj.bias", "embeddings.patch_embeddings.bias"),
    common.Rule("{name:norm.weight|norm.bias}", "{name}"),
    common.Rule("blocks.{i}.attn.{proj:q|k|v}.weight", "layer.{i}.attention.{proj}_proj.kernel", "linear"),
    common.Rule("blocks.{i}.attn.{proj:q|v}.bias", "layer.{i}.attention.{proj}_proj.bias"),
    *_weight_and_bias("blocks.{i}.attn.proj", "layer.{i}.attention.o_proj"),
    common.Rule("blocks.{i}.{norm:norm1|norm2}.{leaf:weight|bias}", "layer.{i}.{norm}.{leaf}"),
    common.Rule("blocks.{i}.ls{n:1|2}.gamma", "layer.{i}.layer_scale{n}.lambda1"),
    *_weight_and_bias("blocks.{i}.mlp.fc1", "layer.{i}.mlp.up_proj"),
    *_weight_and_bias("blocks.{i}.mlp.fc2", "layer.{i}.mlp.down_proj"),
    *_weight_and_bias("blocks.{i}.mlp.w1", "layer.{i}.mlp.gate_proj"),
    *_weight_and_bias("blocks.{i}.mlp.w2", "layer.{i}.mlp.up_proj"),
    *_weight_and_bias("blocks.{i}.mlp.w3", "layer.{i}.mlp.down_proj"),
)


def convert_hf_state(state: Mapping[str, np.ndarray]) -> common.MappedParams:
    """`transformers` DINOv3ViTModel keys -> our parameter paths (with Linear/Conv transposes)."""
    return common.map_weights(state, HF_TABLE, dropped=_DROPPED)


def _split_fused_qkv(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Meta's fused `attn.qkv` -> separate `attn.q` / `attn.k` / `attn.v` entries. DINOv3 masks the key bias
    out (`bias_mask`), so it must be zero after masking and is dropped; a non-zero one is returned as a
    problem (this model has no key bias)."""
    out, problems = {}, []
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias|bias_mask)", key)
        if not m:
            out[key] = value
            continue
        index, leaf = m.groups()
        if leaf == "bias_mask":
            continue
        q, k, v = np.split(value, 3, axis=0)
        prefix = f"blocks.{index}.attn."
        if leaf == "weight":
            out.update({prefix + "q.weight": q, prefix + "k.weight": k, prefix + "v.weight": v})
            continue
        mask = state.get(f"blocks.{index}.attn.qkv.bias_mask")
        k_bias = k * np.split(mask, 3)[1] if mask is not None else k
        if np.any(k_bias != 0):
            problems.append(f"{key} (non-zero key bias: this model has none)")
        out.update({prefix + "q.bias": q, prefix + "v.bias": v})
    return out, problems


def convert_meta_state(state: Mapping[str, np.ndarray]) -> common.MappedParams:
    """Meta's original DINOv3 keys -> our parameter paths: the fused qkv split, then META_TABLE."""
    split, problems = _split_fused_qkv(state)
    params = common.map_weights(split, META_TABLE, dropped=_DROPPED)
    params.unmapped.extend(problems)
    return params


def infer_config(params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], *,
                 num_heads: int | None) -> DINOv3Config:
    """A DINOv3Config from converted tensor shapes, for checkpoints without a config.json. The number of
    heads comes from Meta's RoPE periods ([head_dim/4]) when present, else `num_heads`, else the released
    model of that width."""
    try:
        kernel = params["embeddings.patch_embeddings.kernel"]
        hidden = kernel.shape[-1]
        layers_ = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("layer."))
        gated = "layer.0.mlp.gate_proj.kernel" in params
        intermediate = params["layer.0.mlp.up_proj.kernel"].shape[1]
    except (KeyError, ValueError) as e:
        raise common.CheckpointMismatchError(
            f"cannot infer the DINOv3 architecture from this checkpoint (missing {e}); keys seen: "
            f"{sorted(state)[:12]}...") from None
    if num_heads is None and "rope_embed.periods" in state:
        num_heads = hidden // (4 * state["rope_embed.periods"].shape[0])
    if num_heads is None:
        if hidden not in _RELEASED_HEADS:
            raise ValueError(f"checkpoint width {hidden} is not a released DINOv3 width; pass num_heads=...")
        num_heads = _RELEASED_HEADS[hidden]
    registers = params["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in params else 0
    return DINOv3Config(
        patch_size=kernel.shape[0], hidden_size=hidden, num_layers=layers_, num_heads=num_heads,
        intermediate_size=intermediate, num_register_tokens=registers, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", query_bias="layer.0.attention.q_proj.bias" in params,
        value_bias="layer.0.attention.v_proj.bias" in params, proj_bias="layer.0.attention.o_proj.bias" in params,
        mlp_bias="layer.0.mlp.up_proj.bias" in params)


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_from_hub(repo_id: str, *, revision: str | None = None) -> str:
    """Local folder with config.json and the weights of `repo_id`; a clean HubDownloadError otherwise."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ImportError(f"downloading {repo_id!r} needs huggingface_hub (pip install huggingface_hub)") from None
    offline = _hub_offline()
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, local_files_only=offline,
            allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"])
    except Exception as e:  # the hub raises HTTP, connection, validation and cache errors; all end here
        if offline or isinstance(e, hub_errors.LocalEntryNotFoundError):
            why = ("the Hugging Face Hub is unreachable (offline: HF_HUB_OFFLINE is set)" if offline else
                   "the Hugging Face Hub could not be reached (no network?)")
            hint = "and it is not in the local cache. Download it where there is network, or pass a local folder"
        elif isinstance(e, hub_errors.GatedRepoError):
            why, hint = "the repository is gated", ("accept its licence on huggingface.co and log in (HF_TOKEN), "
                                                     "or pass a local folder")
        elif isinstance(e, (hub_errors.RepositoryNotFoundError, hub_errors.HFValidationError)):
            why, hint = "no such repository (or no access to it)", "check the id, or pass a local folder"
        else:
            why, hint = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "or pass a local folder"
        raise HubDownloadError(
            f"cannot load DINOv3 weights {repo_id!r} (not a local path, so tried as a hub id): {why}; {hint} / "
            ".pth / .safetensors file.") from None


def resolve_source(source: str | os.PathLike, *, revision: str | None = None) -> str:
    """A local path for `source` (downloading a hub id when it is not a local path)."""
    path = os.path.expanduser(os.fspath(source))
    if os.path.exists(path):
        return path
    if _HUB_ID.match(path) and not path.lower().endswith(_CHECKPOINT_EXTENSIONS):
        return download_from_hub(path, revision=revision)
    raise FileNotFoundError(f"DINOv3 weights {path!r}: no such file or folder, and not a hub id (owner/name)")


def _check_rope_periods(state: Mapping[str, np.ndarray], config: DINOv3Config) -> None:
    """Meta's checkpoints store the RoPE periods, which we recompute from rope_theta: they must agree."""
    if "rope_embed.periods" not in state:
        return
    stored = np.asarray(state["rope_embed.periods"], np.float64)
    expected = config.rope_theta ** (np.arange(config.head_dim // 4) * 4 / config.head_dim)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-4):
        raise common.CheckpointMismatchError(
            f"rope_embed.periods {stored.shape} does not match rope_theta {config.rope_theta} and head_dim "
            f"{config.head_dim} (expected theta ** (4 i / head_dim)); pass config= with the right rope_theta")


def load_dinov3(
    source: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention_impl: str | None = "xla",
    config: DINOv3Config | None = None,
    num_heads: int | None = None,
    prefix: str = "",
    revision: str | None = None,
    sharding_for=None,
    scan_layers: bool | None = None,
) -> DINOv3:
    """A DINOv3 with the weights of `source` (HF folder, checkpoint file, or hub id).

    The architecture comes from `config`, else the folder's config.json, else the tensors' shapes (see
    `infer_config`). `prefix` is stripped from keys first (e.g. "backbone." for a wrapped model). The model is
    built abstractly and filled, strictly: one CheckpointMismatchError lists every unused, missing or
    mis-shaped entry. `sharding_for` places each parameter (see common.fill_abstract_model). `scan_layers`
    (None: the config's, else per-layer) stores the blocks stacked (DINOv3Config.scan_layers)."""
    path = resolve_source(source, revision=revision)
    state = common.strip_prefix(common.read_state_dict(path), prefix)
    params = convert_meta_state(state) if _is_meta_layout(state) else convert_hf_state(state)
    if config is None:
        hf_config = common.read_hf_config(path) if os.path.isdir(path) else None
        if hf_config is not None:
            config = DINOv3Config.from_hf_config(hf_config)
            if num_heads is not None:
                config = dataclasses.replace(config, num_heads=num_heads)
        else:
            config = infer_config(params, state, num_heads=num_heads)
    config = dataclasses.replace(config, attention_impl=attention_impl)
    if scan_layers is not None:
        config = dataclasses.replace(config, scan_layers=bool(scan_layers))
    _check_rope_periods(state, config)
    del state
    abstract = nnx.eval_shape(lambda: DINOv3(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return common.fill_abstract_model(abstract, params, what=f"DINOv3 checkpoint {os.fspath(source)!r}",
                                      sharding_for=sharding_for)


# ----------------------------------------------------------------------------------------------------
# The VFM from a config
# ----------------------------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(value: Any):
    """A jnp dtype from a name ("bfloat16", "bf16", "float32", ...) or a dtype."""
    if isinstance(value, str):
        if value.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {value!r}; known: {sorted(_DTYPES)}")
        return _DTYPES[value.lower()]
    return jnp.dtype(value).type


def build_vfm(vfm_config: Mapping[str, Any] | Any) -> DINOv3 | PixelPatchVFM:
    """The VFM of a config {kind: "dinov3"|"pixel", preset, weights, patch_size, num_heads, dtype,
    attention_impl, scan_layers, seed, position_channels (pixel only), overrides}. kind "dinov3" with weights "" is randomly
    initialised from `preset` with `overrides` (DINOv3Config fields, e.g. {hidden_size: 192, num_layers: 4};
    for tests and benchmarks); otherwise `weights` (folder, file or hub id) is loaded and its own config wins."""

    def get(name: str, default: Any) -> Any:
        value = vfm_config.get(name, default) if hasattr(vfm_config, "get") else getattr(vfm_config, name, default)
        return default if value is None else value

    kind = get("kind", "dinov3")
    dtype = as_dtype(get("dtype", "float32"))
    if kind == "pixel":
        return PixelPatchVFM(patch_size=int(get("patch_size", 16)), num_heads=get("num_heads", 0) or None,
                             num_position_channels=int(get("position_channels", 0)), dtype=dtype)
    if kind != "dinov3":
        raise ValueError(f"unknown vfm kind {kind!r}; expected 'dinov3' or 'pixel'")
    attention_impl = get("attention_impl", "xla") or None
    weights = get("weights", "")
    scan_layers = bool(get("scan_layers", False))  # the blocks stored stacked (DINOv3Config.scan_layers)
    if weights:
        return load_dinov3(weights, dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers)
    overrides = dict(get("overrides", {}))
    config = DINOv3Config.preset(get("preset", "vitb16"), **{"attention_impl": attention_impl,
                                                             "scan_layers": scan_layers, **overrides})
    return DINOv3(config, dtype=dtype, rngs=nnx.Rngs(int(get("seed", 0))))
