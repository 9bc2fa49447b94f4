"""Released DeltaWorld / DINO-World weights -> deltaworld_jax modules.

Sources: the released `pytorch_model.bin` (only the trained parameters, official names such as
`predictor.blocks.0.attention.kv_proj.weight`, `predictor.head.weight`, and `q_embed.weight` for the
deterministic DINO-World), or a Lightning `.ckpt` (`state_dict`, names under an optional `network.` prefix;
the frozen tokenizer / backbone entries are dropped). Widths, depth and MLP width come from the tensors'
shapes; the number of heads and the RoPE split are not recoverable from shapes and are keyword arguments
whose defaults are the released models' values.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
from deltaworld_jax.pretrained import common, runs

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


def _world_params(source: str | os.PathLike | Mapping[str, Any]) -> common.MappedParams:
    """The world model's entries under our parameter paths: reads the file (a Lightning checkpoint's
    `state_dict` is unwrapped by common.read_state_dict), strips `network.`, drops the frozen
    tokenizer/backbone entries, maps the official names (WORLD_TABLE, q_embed included)."""
    tensors = dict(source) if isinstance(source, Mapping) else common.read_state_dict(source)
    if "state_dict" in tensors and isinstance(tensors["state_dict"], Mapping):
        tensors = dict(tensors["state_dict"])
    out = {}
    for name, value in tensors.items():
        name = name[len("network."):] if name.startswith("network.") else name
        if name.startswith(_FROZEN_PREFIXES):
            continue
        out[name] = np.asarray(value)
    return common.map_weights(out, _table(with_q_embed=True))


_BLOCK = re.compile(r"predictor\.blocks\.(\d+)\.")


def infer_sizes(params: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Width, depth, MLP width and the backbone width from the shapes of the predictor's parameters under
    our per-layer paths (an official checkpoint after the weight map, or our run's split per layer)."""
    head, kv = "predictor.head.kernel", "predictor.blocks.0.attention.kv_proj.kernel"
    if head not in params or kv not in params:
        named = sorted(getattr(params, "source", {}).values() or params)
        raise ValueError(f"not a DeltaWorld / DINO-World checkpoint: no {head} / {kv} among {named[:8]}...")
    hidden, backbone_hidden = params[head].shape  # kernel [in, out]
    depth = 1 + max(int(m.group(1)) for k in params if (m := _BLOCK.match(k)))
    up = params.get("predictor.blocks.0.mlp.up_proj.kernel")
    if up is None:
        raise ValueError("predictor.blocks.0.mlp.up_proj is missing: the MLP width cannot be inferred")
    intermediate = up.shape[-1]
    if intermediate % hidden:
        raise ValueError(f"MLP width {intermediate} is not a multiple of the width {hidden}")
    return dict(hidden_size=int(hidden), num_layers=int(depth), backbone_hidden_size=int(backbone_hidden),
                mlp_ratio=int(intermediate // hidden))


def _build(model_cls, cfg, params: Mapping[str, np.ndarray], what: str, dtype=None):
    """Strict fill of an abstract build through common.fill_abstract_model: every unused, missing or
    mis-shaped entry in one error."""
    kw = {} if dtype is None else {"dtype": dtype}
    model = nnx.eval_shape(lambda: model_cls(cfg, **kw, rngs=nnx.Rngs(0)))
    return common.fill_abstract_model(model, params, what=f"{model_cls.__name__} {what}")


def _describe(source) -> str:
    return "<in-memory state dict>" if isinstance(source, Mapping) else os.fspath(source)


def _released(config_cls, source, *, num_heads, rope_axis_sizes, rope_unrotated_size, config_overrides):
    """(config, our parameters) of released weights: sizes from the tensors, the rest from the arguments."""
    params = _world_params(source)
    use_bom = config_overrides.pop("use_bom", "q_embed" not in params)
    cfg = config_cls(**infer_sizes(params), num_heads=num_heads, rope_axis_sizes=tuple(rope_axis_sizes),
                     rope_unrotated_size=rope_unrotated_size, use_bom=use_bom, **config_overrides)
    return cfg, params


def _check_token_width(tokenizer: Any, cfg: DeltaWorldConfig, what: str) -> None:
    token_width = getattr(getattr(tokenizer, "cfg", None), "hidden_size", None)
    if token_width is not None and token_width != cfg.backbone_hidden_size:
        raise ValueError(f"the tokenizer makes {token_width}-wide tokens, {what} predictor reads "
                         f"{cfg.backbone_hidden_size}")


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
    cfg, params = _released(DeltaWorldConfig, source, num_heads=num_heads, rope_axis_sizes=rope_axis_sizes,
                            rope_unrotated_size=rope_unrotated_size, config_overrides=config_overrides)
    _check_token_width(tokenizer, cfg, "the checkpoint's")
    return _build(DeltaWorld, cfg, params, f"checkpoint {_describe(source)}", dtype)


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
    cfg, params = _released(DINOWorldConfig, source, num_heads=num_heads, rope_axis_sizes=rope_axis_sizes,
                            rope_unrotated_size=rope_unrotated_size, config_overrides=config_overrides)
    if vfm is not None and vfm.hidden_size != cfg.backbone_hidden_size:
        raise ValueError(f"the VFM makes {vfm.hidden_size}-wide features, the checkpoint's predictor reads "
                         f"{cfg.backbone_hidden_size}")
    return _build(DINOWorld, cfg, params, f"checkpoint {_describe(source)}", dtype)


# Sizes the parameters of a run without a MODEL_CONFIG record cannot tell: the caller's, else released.
_RUN_SIZES = {"num_heads": 12, "rope_axis_sizes": (60,), "rope_unrotated_size": 4}


def deltaworld_from_run(run: "runs.Run", *, tokenizer: Any = None, attention_impl: str | None = "xla",
                        scan_layers: bool = False, dtype=None, **sizes: Any) -> DeltaWorld:
    """A DeltaWorld from our own training run (pretrained.runs.read_run), built from its parameters as they
    are named in the run. Its config is the one the run recorded, and `sizes` (num_heads, rope_axis_sizes,
    rope_unrotated_size) given here must agree with it; a run from before the trainer recorded it has its
    widths and depth read off the parameters (infer_sizes) and `sizes` (default: the released values) for
    what they cannot tell. How the model runs (attention_impl, scan_layers: the block layout, filled from
    either stored layout) is the caller's choice, not the run's."""
    unknown = set(sizes) - set(_RUN_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes {sorted(unknown)}; known: {sorted(_RUN_SIZES)}")
    if run.family not in ("deltaworld", "world"):
        raise ValueError(f"{run.folder} step {run.step} holds a {run.family} model, not a DeltaWorld")
    given = {k: (tuple(v) if k == "rope_axis_sizes" else v) for k, v in sizes.items() if v is not None}
    params = run.per_layer_params()
    execution = dict(attention_impl=attention_impl, scan_layers=scan_layers)
    if run.record is not None:
        cfg = dataclasses.replace(runs.config_from_record(DeltaWorldConfig, run.record), **execution)
        differ = {k: (v, getattr(cfg, k)) for k, v in given.items() if v != getattr(cfg, k)}
        if differ:
            raise ValueError("the run was trained with " + ", ".join(
                f"{k}={trained} (not {v})" for k, (v, trained) in differ.items()) + f" ({runs.MODEL_CONFIG})")
    else:
        cfg = DeltaWorldConfig(**infer_sizes(params), **{**_RUN_SIZES, **given}, use_bom="q_embed" not in params,
                               **execution)
    _check_token_width(tokenizer, cfg, "the run's")
    return _build(DeltaWorld, cfg, params, f"run {run.folder} step {run.step}", dtype)
