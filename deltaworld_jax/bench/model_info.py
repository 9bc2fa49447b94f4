"""Sizes and parameter counts of the modules a config builds, read from abstract modules (no allocation).

The modules are found by type anywhere in the trainable and frozen graphs (a frozen tuple/dict of VFM and
tokenizer, a world model holding a predictor, ...), so this works for every task without knowing how it
nests its modules.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from deltaworld_jax.bench import flops as flops_lib
from deltaworld_jax.models import dinov3, layers
from deltaworld_jax.models.deltatok import DeltaTok
from deltaworld_jax.models.predictor import Predictor


def find_modules(roots: list[Any], cls: type) -> list[Any]:
    found = []
    for root in roots:
        if root is None:
            continue
        for _, node in nnx.iter_graph(root):
            if isinstance(node, cls) and not any(node is f for f in found):
                found.append(node)
    return found


def first(roots: list[Any], cls) -> Any:
    found = find_modules(roots, cls)
    return found[0] if found else None


def params_of(node) -> int:
    return 0 if node is None else layers.count_params(node)


def vfm_dims(vfm) -> flops_lib.VFMDims:
    if isinstance(vfm, dinov3.DINOv3):
        c = vfm.config
        return flops_lib.VFMDims(
            flops_lib.StackDims(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, bool(c.use_gated_mlp)),
            c.patch_size, 1 + c.num_register_tokens)
    # The pixel-patch VFM has no parameters and does no matmuls: features are the pixels themselves.
    return flops_lib.VFMDims(flops_lib.StackDims(vfm.hidden_size, 0, vfm.num_heads, 0), vfm.patch_size, 0,
                             patch_embed=False)


def tokenizer_dims(tok: DeltaTok) -> flops_lib.StackDims:
    c = tok.cfg
    return flops_lib.StackDims(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, bool(c.use_swiglu),
                               bool(c.use_gated_attn))


def predictor_dims(pred: Predictor) -> flops_lib.PredictorDims:
    c = pred.cfg
    return flops_lib.PredictorDims(c.hidden_size, c.num_layers, c.num_heads, c.hidden_size * c.mlp_ratio,
                                   c.backbone_hidden_size, c.backbone_hidden_size)


def vfm_module(roots):
    return first(roots, dinov3.DINOv3) or first(roots, dinov3.PixelPatchVFM)


def component_params(trainable, frozen) -> dict[str, int]:
    """Parameters per component: VFM, DeltaTok encoder (blocks, z/xy embeddings, token norm), DeltaTok
    decoder, predictor, and the trained total."""
    roots = [trainable, frozen]
    out: dict[str, int] = {}
    vfm = vfm_module(roots)
    if vfm is not None:
        out["vfm"] = params_of(vfm)
    tok = first(roots, DeltaTok)
    if tok is not None:
        decoder = sum(params_of(b) for b in tok.decoder_blocks)
        out["deltatok encoder"] = params_of(tok) - decoder
        out["deltatok decoder"] = decoder
    pred = first(roots, Predictor)
    if pred is not None:
        out["predictor"] = params_of(pred)
    out["trained (total)"] = params_of(trainable)
    return out


def param_bytes(module) -> int:
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(nnx.state(module, nnx.Param))))
