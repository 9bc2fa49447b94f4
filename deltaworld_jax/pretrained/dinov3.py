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
_DROPPED = re.compile(r"^(embeddings\.mask_token|mask_token|rope_embeddings\.inv_freq|rope_embed\.periods)$")

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


def _put_weight(out: common.MappedParams, module: str, kind: str, value: np.ndarray, source: str) -> None:
    """Puts checkpoint tensor `source` under our `module`: a torch Linear ("linear") or Conv ("conv") weight
    becomes a transposed `kernel`; anything else ("keep", and biases) keeps its leaf name."""
    leaf = source.rsplit(".", 1)[-1]
    if kind == "linear" and leaf == "weight":
        out.put(f"{module}.kernel", common.torch_linear_to_kernel(value), source)
    elif kind == "conv" and leaf == "weight":
        out.put(f"{module}.kernel", common.torch_conv_to_kernel(value), source)
    else:
        out.put(f"{module}.{leaf}", value, source)


_HF_LAYER_RULES = [  # (regex on the key inside one layer, kind)
    (re.compile(r"^(norm1|norm2)\.(weight|bias)$"), "keep"),
    (re.compile(r"^attention\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$"), "linear"),
    (re.compile(r"^(layer_scale1|layer_scale2)\.lambda1$"), "keep"),
    (re.compile(r"^mlp\.(up_proj|down_proj|gate_proj)\.(weight|bias)$"), "linear"),
]


def convert_hf_state(state: Mapping[str, np.ndarray]) -> common.MappedParams:
    """`transformers` DINOv3ViTModel keys -> our parameter paths (with Linear/Conv transposes)."""
    out = common.MappedParams()
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        m = re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", key)
        if m:
            index, rest = m.groups()
            for rule, kind in _HF_LAYER_RULES:
                if rule.match(rest):
                    _put_weight(out, f"layer.{index}.{rest.rsplit('.', 1)[0]}", kind, value, key)
                    break
            else:
                out.unmapped.append(key)
        elif key in ("embeddings.cls_token", "embeddings.register_tokens", "norm.weight", "norm.bias"):
            out.put(key, value, key)
        elif key in ("embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.bias"):
            _put_weight(out, "embeddings.patch_embeddings", "conv", value, key)
        else:
            out.unmapped.append(key)
    return out


def convert_meta_state(state: Mapping[str, np.ndarray]) -> common.MappedParams:
    """Meta's original DINOv3 keys -> our parameter paths. The fused qkv is split into q/k/v; the key
    bias is masked out by DINOv3 (`bias_mask`), so it must be zero after masking and is dropped."""
    out = common.MappedParams()
    layer_map = {"norm1": ("norm1", "keep"), "norm2": ("norm2", "keep"), "attn.proj": ("attention.o_proj", "linear"),
                 "mlp.fc1": ("mlp.up_proj", "linear"), "mlp.fc2": ("mlp.down_proj", "linear"),
                 # SwiGLU: w3(silu(w1 x) * w2 x)
                 "mlp.w1": ("mlp.gate_proj", "linear"), "mlp.w2": ("mlp.up_proj", "linear"),
                 "mlp.w3": ("mlp.down_proj", "linear")}
    for key, value in state.items():
        if _DROPPED.match(key) or re.match(r"^blocks\.\d+\.attn\.qkv\.bias_mask$", key):
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if key == "cls_token":
            out.put("embeddings.cls_token", value, key)
        elif key == "storage_tokens":
            out.put("embeddings.register_tokens", value, key)
        elif key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            _put_weight(out, "embeddings.patch_embeddings", "conv", value, key)
        elif key in ("norm.weight", "norm.bias"):
            out.put(key, value, key)
        elif m and m.group(2) == "attn.qkv":
            index, _, leaf = m.groups()
            q, k, v = np.split(value, 3, axis=0)
            if leaf == "bias":
                mask = state.get(f"blocks.{index}.attn.qkv.bias_mask")
                k_bias = k * np.split(mask, 3)[1] if mask is not None else k
                if np.any(k_bias != 0):
                    out.unmapped.append(f"{key} (non-zero key bias: this model has none)")
                out.put(f"layer.{index}.attention.q_proj.bias", q, key)
                out.put(f"layer.{index}.attention.v_proj.bias", v, key)
            else:
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    _put_weight(out, f"layer.{index}.attention.{name}", "linear", part, key)
        elif m and m.group(2) in ("ls1", "ls2") and m.group(3) == "gamma":
            out.put(f"layer.{m.group(1)}.layer_scale{m.group(2)[-1]}.lambda1", value, key)
        elif m and m.group(2) in layer_map:
            module, kind = layer_map[m.group(2)]
            _put_weight(out, f"layer.{m.group(1)}.{module}", kind, value, key)
        else:
            out.unmapped.append(key)
    return out


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
) -> DINOv3:
    """A DINOv3 with the weights of `source` (HF folder, checkpoint file, or hub id).

    The architecture comes from `config`, else the folder's config.json, else the tensors' shapes (see
    `infer_config`). `prefix` is stripped from keys first (e.g. "backbone." for a wrapped model). The model is
    built abstractly and filled, strictly: one CheckpointMismatchError lists every unused, missing or
    mis-shaped entry. `sharding_for` places each parameter (see common.fill_abstract_model)."""
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
    attention_impl, seed, position_channels (pixel only), overrides}. kind "dinov3" with weights "" is randomly
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
    if weights:
        return load_dinov3(weights, dtype=dtype, attention_impl=attention_impl)
    overrides = dict(get("overrides", {}))
    config = DINOv3Config.preset(get("preset", "vitb16"), **{"attention_impl": attention_impl, **overrides})
    return DINOv3(config, dtype=dtype, rngs=nnx.Rngs(int(get("seed", 0))))
