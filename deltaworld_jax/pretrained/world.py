"""Released DeltaWorld / DINO-World weights -> deltaworld_jax modules.

Sources: the released `pytorch_model.bin` (only the trained parameters, official names such as
`predictor.blocks.0.attention.kv_proj.weight`, `predictor.head.weight`, and `q_embed.weight` for the
deterministic DINO-World), or a Lightning `.ckpt` (`state_dict`, names under an optional `network.` prefix;
the frozen tokenizer / backbone entries are dropped). Widths, depth and MLP width come from the tensors'
shapes; the number of heads and the RoPE split are not recoverable from shapes and are keyword arguments
whose defaults are the released models' values.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
from deltaworld_jax.pretrained import common

# Entries of a training checkpoint that belong to the frozen parts, not to the world model.
_FROZEN_PREFIXES = ("tokenizer.", "backbone.", "task_heads.")

# The weight map (official name -> our path): our parameter paths are the official module names, with each
# Linear's torch `weight` [out, in] as our transposed `kernel` [in, out].
_LINEARS = "attention.q_proj|attention.kv_proj|attention.out_proj|mlp.up_proj|mlp.down_proj"
_VECTORS = "norm1.weight|norm1.bias|norm2.weight|norm2.bias|layer_scale1.lambda1|layer_scale2.lambda1"
WORLD_TABLE: tuple[common.Rule, ...] = (
    common.Rule("predictor.blocks.{i}.{linear:" + _LINEARS + "}.weight",
                "predictor.blocks.{i}.{linear}.kernel", "linear"),
    common.Rule("predictor.blocks.{i}.{linear:" + _LINEARS + "}.bias", "predictor.blocks.{i}.{linear}.bias"),
    common.Rule("predictor.blocks.{i}.{vector:" + _VECTORS + "}", "predictor.blocks.{i}.{vector}"),
    common.Rule("predictor.{name:norm.weight|norm.bias}", "predictor.{name}"),
    common.Rule("predictor.head.weight", "predictor.head.kernel", "linear"),
    common.Rule("predictor.head.bias", "predictor.head.bias"),
)
Q_EMBED_RULE = common.Rule("q_embed.weight", "q_embed")  # only the deterministic (no best-of-K) models


def _table(with_q_embed: bool) -> tuple[common.Rule, ...]:
    return WORLD_TABLE + ((Q_EMBED_RULE,) if with_q_embed else ())


def world_key_map(num_layers: int, with_q_embed: bool) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Every official name -> (path in the nnx module, transpose?), enumerated from WORLD_TABLE. Linear
    weights are [out, in] in torch and [in, out] (`kernel`) here."""
    mapping: dict[str, tuple[tuple[Any, ...], bool]] = {}
    for rule in _table(with_q_embed):
        for fields in rule.expand(num_layers):
            ours = rule.fill(rule.ours, fields)
            path = tuple(int(part) if part.isdigit() else part for part in ours.split("."))
            mapping[rule.fill(rule.official, fields)] = (path, rule.layout == "linear")
    return mapping


def world_state_dict(model: DeltaWorld | DINOWorld) -> dict[str, np.ndarray]:
    """The model's parameters under the official names and layouts (the inverse of the loaders)."""
    return common.unmap_weights(common.model_params(model), _table(not model.cfg.use_bom))


def _world_tensors(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat numpy dict of the world model's entries: reads the file (a Lightning checkpoint's `state_dict`
    is unwrapped by common.read_state_dict), strips `network.`, drops the frozen tokenizer/backbone entries."""
    tensors = dict(source) if isinstance(source, Mapping) else common.read_state_dict(source)
    if "state_dict" in tensors and isinstance(tensors["state_dict"], Mapping):
        tensors = dict(tensors["state_dict"])
    out = {}
    for name, value in tensors.items():
        name = name[len("network."):] if name.startswith("network.") else name
        if name.startswith(_FROZEN_PREFIXES):
            continue
        out[name] = np.asarray(value)
    return out


def _infer_sizes(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Width, depth, MLP width and the backbone width from the tensors' shapes."""
    if "predictor.head.weight" not in tensors or "predictor.blocks.0.attention.kv_proj.weight" not in tensors:
        raise ValueError("not a DeltaWorld / DINO-World checkpoint: no predictor.head.weight / "
                         f"predictor.blocks.0.attention.kv_proj.weight among {sorted(tensors)[:8]}...")
    backbone_hidden, hidden = tensors["predictor.head.weight"].shape
    depth = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("predictor.blocks."))
    up = tensors.get("predictor.blocks.0.mlp.up_proj.weight")
    if up is None:
        raise ValueError("predictor.blocks.0.mlp.up_proj.weight is missing: the MLP width cannot be inferred")
    intermediate = up.shape[0]
    if intermediate % hidden:
        raise ValueError(f"MLP width {intermediate} is not a multiple of the width {hidden}")
    return dict(hidden_size=int(hidden), num_layers=int(depth), backbone_hidden_size=int(backbone_hidden),
                mlp_ratio=int(intermediate // hidden))


def _fill(abstract: DeltaWorld | DINOWorld, tensors: Mapping[str, np.ndarray], what: str):
    """Strict fill through common.fill_abstract_model: every unused, missing or mis-shaped entry in one error."""
    params = common.map_weights(tensors, _table(not abstract.cfg.use_bom))
    return common.fill_abstract_model(abstract, params, what=what)


def _describe(source) -> str:
    return "<in-memory state dict>" if isinstance(source, Mapping) else os.fspath(source)


def load_deltaworld(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    tokenizer: Any = None,
    num_heads: int = 12,
    rope_axis_sizes: tuple[int, ...] = (60,),
    rope_unrotated_size: int = 4,
    dtype=None,
    **config_overrides,
) -> DeltaWorld:
    """A DeltaWorld from released weights. `tokenizer` (a DeltaTok), when given, must produce tokens of the
    checkpoint's width (checked). Other DeltaWorldConfig fields (use_bom, num_samples_eval, ...) may be
    passed as keyword arguments."""
    tensors = _world_tensors(source)
    sizes = _infer_sizes(tensors)
    use_bom = config_overrides.pop("use_bom", "q_embed.weight" not in tensors)
    cfg = DeltaWorldConfig(**sizes, num_heads=num_heads, rope_axis_sizes=tuple(rope_axis_sizes),
                           rope_unrotated_size=rope_unrotated_size, use_bom=use_bom, **config_overrides)
    token_width = getattr(getattr(tokenizer, "cfg", None), "hidden_size", None)
    if token_width is not None and token_width != cfg.backbone_hidden_size:
        raise ValueError(f"the tokenizer makes {token_width}-wide tokens, the checkpoint's predictor reads "
                         f"{cfg.backbone_hidden_size}")
    kw = {} if dtype is None else {"dtype": dtype}
    model = nnx.eval_shape(lambda: DeltaWorld(cfg, **kw, rngs=nnx.Rngs(0)))
    return _fill(model, tensors, f"{type(model).__name__} checkpoint {_describe(source)}")


def load_dinoworld(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    vfm: Any = None,
    num_heads: int = 12,
    rope_axis_sizes: tuple[int, ...] = (20, 20, 20),
    rope_unrotated_size: int = 4,
    dtype=None,
    **config_overrides,
) -> DINOWorld:
    """A DINO-World from released weights; `vfm`, when given, must have the checkpoint's feature width."""
    tensors = _world_tensors(source)
    sizes = _infer_sizes(tensors)
    use_bom = config_overrides.pop("use_bom", "q_embed.weight" not in tensors)
    cfg = DINOWorldConfig(**sizes, num_heads=num_heads, rope_axis_sizes=tuple(rope_axis_sizes),
                          rope_unrotated_size=rope_unrotated_size, use_bom=use_bom, **config_overrides)
    if vfm is not None and vfm.hidden_size != cfg.backbone_hidden_size:
        raise ValueError(f"the VFM makes {vfm.hidden_size}-wide features, the checkpoint's predictor reads "
                         f"{cfg.backbone_hidden_size}")
    kw = {} if dtype is None else {"dtype": dtype}
    model = nnx.eval_shape(lambda: DINOWorld(cfg, **kw, rngs=nnx.Rngs(0)))
    return _fill(model, tensors, f"{type(model).__name__} checkpoint {_describe(source)}")
