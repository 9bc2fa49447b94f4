"""Import of the official task heads: segmentation probes (VSPW, Cityscapes), the KITTI depth probe, and the
ImageNet RGB decoder.

    seg = load_head("vspw_head.pth", "seg-head-vspw")
    depth = load_head("kitti_head.pth", "depth-head-kitti")
    rgb = load_head("rgb_head.pth", "rgb-head-imagenet", norm_weight=vfm_norm_w, norm_bias=vfm_norm_b)

Sizes are inferred from the tensors (feature width, classes, bins, decoder width/depth/MLP/patch, and the
position table's grid); the RGB decoder's number of heads cannot be, and defaults to the released 16.
The RGB head also needs the VFM's final LayerNorm weight/bias (its input transform undoes that affine).
Loading is strict: every missing, unused or mis-shaped tensor is reported in one error.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.heads import (IMAGENET_MEAN, IMAGENET_STD, KITTI_MAX_DEPTH, KITTI_MIN_DEPTH,
                                         DepthHead, RGBHead, SegHead, sincos_pos_embed)
from deltaworld_jax.pretrained import common

HEAD_KINDS = ("seg-head-vspw", "seg-head-cityscapes", "depth-head-kitti", "rgb-head-imagenet")
_EXPECTED_CLASSES = {"seg-head-vspw": 124, "seg-head-cityscapes": 19}
# Buffers that PyTorch stores but our inference-only modules have no use for.
_IGNORED_KEYS = re.compile(r"(^|\.)num_batches_tracked$")


def _read(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        flat = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in source.items()}
    else:
        flat = common.read_state_dict(source)
    return {k: v for k, v in flat.items() if not _IGNORED_KEYS.search(k)}


# The weight maps: a Linear's (or 1x1 conv's) torch `weight` becomes our transposed `kernel`; every other
# entry (norm scales and biases, BatchNorm statistics, position table, fixed buffers) keeps its name.
_SAME_NAME = common.Rule("{key:.+}", "{key}")
PROBE_TABLE: tuple[common.Rule, ...] = (common.Rule("head.weight", "head.kernel", "linear_or_1x1"), _SAME_NAME)
_RGB_LINEARS = ("decoder_embed|decoder_pred|decoder_layers.{i}.attention.attention.query|"
                "decoder_layers.{i}.attention.attention.key|decoder_layers.{i}.attention.attention.value|"
                "decoder_layers.{i}.attention.output.dense|decoder_layers.{i}.intermediate.dense|"
                "decoder_layers.{i}.output.dense")
RGB_TABLE: tuple[common.Rule, ...] = tuple(
    common.Rule(module + ".weight", module + ".kernel", "linear_or_1x1") for module in _RGB_LINEARS.split("|")
) + (_SAME_NAME,)


def _require(tensors: dict[str, np.ndarray], *names: str) -> None:
    absent = [n for n in names if n not in tensors]
    if absent:
        raise ValueError(f"Not a task-head checkpoint: missing {absent}; it has {sorted(tensors)[:20]}...")


def load_head(source, kind: str, *, norm_weight=None, norm_bias=None, num_heads: int = 16,
              img_size: int = 512) -> nnx.Module:
    """Build a head of `kind` (one of HEAD_KINDS) and fill it from `source` (a .pth/.bin/.safetensors file or
    a mapping of name -> array). `norm_weight` / `norm_bias` (the VFM's final LayerNorm affine) are required
    for 'rgb-head-imagenet'; `num_heads` is the RGB decoder's head count; `img_size` is only used when the
    checkpoint lacks the position table (it is then rebuilt for that size)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"Unknown head kind {kind!r}; known: {HEAD_KINDS}")
    tensors = _read(source)

    if kind.startswith("seg-head"):
        _require(tensors, "bn.weight", "head.weight")
        num_classes, in_features = tensors["head.weight"].shape[:2]
        if num_classes != _EXPECTED_CLASSES[kind]:
            raise ValueError(f"{kind} expects {_EXPECTED_CLASSES[kind]} classes, the checkpoint has {num_classes}")
        model = nnx.eval_shape(lambda: SegHead(in_features, num_classes, rngs=nnx.Rngs(0)))
        return common.fill_abstract_model(model, common.map_weights(tensors, PROBE_TABLE), what=kind)

    if kind == "depth-head-kitti":
        _require(tensors, "bn.weight", "head.weight")
        num_bins, in_features = tensors["head.weight"].shape[:2]
        model = nnx.eval_shape(lambda: DepthHead(in_features, min_depth=KITTI_MIN_DEPTH, max_depth=KITTI_MAX_DEPTH,
                                                 num_bins=num_bins, rngs=nnx.Rngs(0)))
        return common.fill_abstract_model(model, common.map_weights(tensors, PROBE_TABLE), what=kind)

    _require(tensors, "decoder_embed.weight", "decoder_pred.weight", "decoder_layers.0.intermediate.dense.weight")
    if norm_weight is None or norm_bias is None:
        raise ValueError("rgb-head-imagenet needs the VFM's final LayerNorm weight and bias "
                         "(norm_weight=..., norm_bias=...)")
    hidden_size, in_features = tensors["decoder_embed.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"decoder_layers\.(\d+)\.", k)))
    mlp_size = tensors["decoder_layers.0.intermediate.dense.weight"].shape[0]
    patch_size = int(round((tensors["decoder_pred.weight"].shape[0] // 3) ** 0.5))
    if patch_size * patch_size * 3 != tensors["decoder_pred.weight"].shape[0]:
        raise ValueError(f"decoder_pred.weight {tensors['decoder_pred.weight'].shape} is not patch*patch*3 outputs")
    if "decoder_pos_embed" in tensors:
        grid = int(round((tensors["decoder_pos_embed"].shape[1] - 1) ** 0.5))
        img_size = grid * patch_size
    model = nnx.eval_shape(lambda: RGBHead(
        in_features, jnp.ones((in_features,)), jnp.zeros((in_features,)), hidden_size=hidden_size, depth=depth,
        num_heads=num_heads, mlp_size=mlp_size, patch_size=patch_size, img_size=img_size, rngs=nnx.Rngs(0)))
    if "decoder_pos_embed" not in tensors:
        tensors = {**tensors, "decoder_pos_embed": sincos_pos_embed(hidden_size, img_size // patch_size)}
    # The fixed buffers (not in the checkpoint): the VFM's norm affine and the image statistics.
    tensors = {**tensors, "norm_weight": np.asarray(norm_weight, np.float32).reshape(-1),
               "norm_bias": np.asarray(norm_bias, np.float32).reshape(-1),
               "img_mean": np.asarray(IMAGENET_MEAN, np.float32), "img_std": np.asarray(IMAGENET_STD, np.float32)}
    return common.fill_abstract_model(model, common.map_weights(tensors, RGB_TABLE), what=kind)
