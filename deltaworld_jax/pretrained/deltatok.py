"""Import of official DeltaTok weights (released `pytorch_model.bin`, Lightning `.ckpt`, safetensors).

Released checkpoints carry no config, so every size is read off the tensors: the width from `z_embed`, the
depth from the block indices, the MLP width from `up_proj`, the number of heads from the per-head gate
(`attn_gate`, out dim = heads) or the QK-norm (head_dim), and use_swiglu / use_qk_norm / use_gated_attn from
which keys exist. What the tensors cannot tell (use_delta, RoPE settings, heads when neither per-head tensor
exists) comes from keyword arguments whose defaults are the released model's.

Loading is strict: every checkpoint key that maps to no parameter, every parameter the checkpoint lacks and
every shape mismatch is reported in ONE error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.pretrained import common, runs

# Prefix of the trained network inside a Lightning checkpoint's state_dict (the LightningModule's
# `network` attribute) and of the frozen VFM inside the network (never part of DeltaTok's weights).
LIGHTNING_PREFIX = "network."
FROZEN_VFM_PREFIX = "backbone."


def deltatok_state_dict(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DeltaTok's own tensors from a flat checkpoint dict: strips the Lightning `network.` prefix (keeping
    only the network's keys when it is present, so sibling modules such as task heads are not mistaken for
    DeltaTok's) and drops the frozen VFM's `backbone.*` tensors."""
    if any(k.startswith(LIGHTNING_PREFIX) for k in raw):
        raw = {k[len(LIGHTNING_PREFIX):]: v for k, v in raw.items() if k.startswith(LIGHTNING_PREFIX)}
    return {k: v for k, v in raw.items() if not k.startswith(FROZEN_VFM_PREFIX)}


def infer_config(params: Mapping[str, np.ndarray], *, num_heads: int | None = None,
                 heads_source: str = "num_heads", **overrides: Any) -> DeltaTokConfig:
    """A DeltaTokConfig whose sizes and switches are read from DeltaTok's parameters under OUR per-layer
    paths (an official checkpoint after `to_model_params`, or our run's parameters split per layer)."""
    for key in ("z_embed.weight", "encoder_blocks.0.mlp.up_proj.kernel"):
        if key not in params:
            raise ValueError(f"Not a DeltaTok checkpoint: no {key!r} among {len(params)} entries "
                             f"(first few: {sorted(getattr(params, 'source', {}).values() or params)[:5]})")
    hidden = int(params["z_embed.weight"].shape[-1])
    depth = {name: 1 + max((int(m.group(1)) for k in params if (m := re.match(rf"{name}\.(\d+)\.", k))),
                           default=-1)
             for name in ("encoder_blocks", "decoder_blocks")}
    if depth["encoder_blocks"] != depth["decoder_blocks"]:
        raise ValueError(f"encoder has {depth['encoder_blocks']} blocks but decoder has "
                         f"{depth['decoder_blocks']}; DeltaTok uses one depth for both")
    block = "encoder_blocks.0."
    use_gated_attn = f"{block}attention.attn_gate.kernel" in params
    use_qk_norm = f"{block}attention.q_norm.weight" in params
    heads_from_tensors = None
    if use_gated_attn:  # kernel [hidden, heads]
        heads_from_tensors = int(params[f"{block}attention.attn_gate.kernel"].shape[-1])
    elif use_qk_norm:
        heads_from_tensors = hidden // int(params[f"{block}attention.q_norm.weight"].shape[0])
    if heads_from_tensors is not None and num_heads is not None and num_heads != heads_from_tensors:
        raise ValueError(f"{heads_source}={num_heads} but the checkpoint's per-head tensors say "
                         f"{heads_from_tensors} heads")
    heads = heads_from_tensors or num_heads
    if heads is None:
        raise ValueError("This checkpoint has neither attn_gate nor q_norm, so its number of heads cannot be "
                         "read from the tensors: pass num_heads= (or vfm=, whose num_heads is used)")
    return DeltaTokConfig(
        hidden_size=hidden,
        num_layers=depth["encoder_blocks"],
        num_heads=heads,
        intermediate_size=int(params[f"{block}mlp.up_proj.kernel"].shape[-1]),
        use_swiglu=f"{block}mlp.gate_proj.kernel" in params,
        use_qk_norm=use_qk_norm,
        use_gated_attn=use_gated_attn,
        **overrides,
    )


def load_deltatok(
    source: Any,
    *,
    vfm: nnx.Module | None = None,
    num_heads: int | None = None,
    use_delta: bool = True,
    use_rope_aug: bool = True,
    rope_theta: float = 100.0,
    rope_rescale: float = 2.0,
    norm_eps: float = 1e-5,
    attention_impl: str | None = "xla",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scan_layers: bool = False,
) -> DeltaTok:
    """A DeltaTok filled from official weights.

    source: a `pytorch_model.bin` / `.pth`, a Lightning `.ckpt` (`state_dict` with or without the
    `network.` prefix; the frozen VFM's `backbone.*` keys are dropped), a `.safetensors` file, a folder
    holding one of those, or an already-read flat mapping {name: array}. vfm: the frozen VFM the tokenizer
    runs on; its width is checked against the checkpoint and its num_heads used when the tensors cannot
    tell. scan_layers: both stacks stored stacked (DeltaTokConfig.scan_layers); the same weights either way."""
    raw = dict(source) if isinstance(source, Mapping) else common.read_state_dict(source)
    params = to_model_params(deltatok_state_dict(raw))
    cfg = _config_for(params, vfm, num_heads, use_delta=use_delta, use_rope_aug=use_rope_aug,
                      rope_theta=rope_theta, rope_rescale=rope_rescale, norm_eps=norm_eps,
                      attention_impl=attention_impl, scan_layers=scan_layers)
    return _fill(cfg, params, "DeltaTok checkpoint", dtype, param_dtype)


def _config_for(params: Mapping[str, np.ndarray], vfm: nnx.Module | None, num_heads: int | None,
                **settings: Any) -> DeltaTokConfig:
    """infer_config, with the VFM's width checked against the checkpoint's and its heads used when the
    tensors cannot tell (the official DeltaTok always takes its heads from the VFM)."""
    heads_source = "num_heads"
    if vfm is not None:
        width = int(params["z_embed.weight"].shape[-1]) if "z_embed.weight" in params else None
        if width is not None and int(vfm.hidden_size) != width:
            raise ValueError(f"The checkpoint's DeltaTok width {width} does not match the VFM's hidden_size "
                             f"{vfm.hidden_size}")
        if num_heads is None:
            num_heads, heads_source = int(vfm.num_heads), "the VFM's num_heads"
    return infer_config(params, num_heads=num_heads, heads_source=heads_source, **settings)


def _fill(cfg: DeltaTokConfig, params: Mapping[str, np.ndarray], what: str, dtype=jnp.float32,
          param_dtype=jnp.float32) -> DeltaTok:
    abstract = nnx.eval_shape(lambda: DeltaTok(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return common.fill_abstract_model(abstract, params, what=what)


def deltatok_from_run(run: "runs.Run", *, vfm: nnx.Module | None = None, attention_impl: str | None = "xla",
                      scan_layers: bool = False, dtype=jnp.float32) -> DeltaTok:
    """A DeltaTok from our own training run (pretrained.runs.read_run), built from its parameters as they
    are named in the run. Its config is the one the run recorded; a run from before the trainer recorded
    it has its sizes read off the parameters (infer_config) and the released values for the rest (use_delta,
    RoPE settings). How the model runs (attention_impl, scan_layers: the block layout, filled from either
    stored layout) is the caller's choice, not the run's."""
    if run.family not in ("deltatok", None):
        raise ValueError(f"{run.folder} step {run.step} holds a {run.family} model, not a DeltaTok")
    params = run.per_layer_params()
    execution = dict(attention_impl=attention_impl, scan_layers=scan_layers)
    if run.record is not None:
        cfg = dataclasses.replace(runs.config_from_record(DeltaTokConfig, run.record), **execution)
        if vfm is not None and int(vfm.hidden_size) != cfg.hidden_size:
            raise ValueError(f"The run's DeltaTok width {cfg.hidden_size} does not match the VFM's hidden_size "
                             f"{vfm.hidden_size}")
    else:
        cfg = _config_for(params, vfm, None, **execution)
    return _fill(cfg, params, f"DeltaTok run {run.folder} step {run.step}", dtype)


# The weight map: our parameter paths are the official names, with each Linear's torch `weight` [out, in] as
# our transposed `kernel` [in, out]; everything else (biases, norms, LayerScale, z/xy embeddings) keeps its
# name. A key that names no parameter keeps its own name too, so the strict fill reports it as unused.
_LINEARS = "attention.q_proj|attention.k_proj|attention.v_proj|attention.o_proj|attention.attn_gate|" \
           "mlp.up_proj|mlp.gate_proj|mlp.down_proj"
DELTATOK_TABLE: tuple[common.Rule, ...] = (
    common.Rule("{stack:encoder_blocks|decoder_blocks}.{i}.{linear:" + _LINEARS + "}.weight",
                "{stack}.{i}.{linear}.kernel", "linear"),
    common.Rule("{key:.+}", "{key}"),
)


def to_model_params(sd: Mapping[str, np.ndarray]) -> common.MappedParams:
    """{our dotted path: array} from official names, by DELTATOK_TABLE."""
    return common.map_weights(sd, DELTATOK_TABLE)
