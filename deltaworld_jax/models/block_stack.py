"""Stacks of identical blocks, in two layouts (`make_blocks`): per-layer modules, or one `BlockStack` whose
parameters are stored stacked on a leading layer axis; and `run_blocks`, which runs the first unrolled and
the second as one scan (either optionally rematerialised: REMAT_POLICIES).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from deltaworld_jax import sharding as sharding_lib

Array = jax.Array

# Rematerialisation policies of a scanned block stack (a model option: `remat` of the model configs).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input, recompute the block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise work
    # keep only the weight matmuls (no batch dims); recompute attention's QK^T / AV and elementwise work
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# "auto", the default of the model configs' `remat`: SCANNED_REMAT for a scanned stack (a BlockStack of two
# blocks or more), "none" for per-layer (unrolled) blocks. Why not "none" everywhere: a scanned stack cannot
# lean on XLA's own rematerialisation, which on the unrolled stack recomputed the cheap, large activations
# (attention logits/probabilities, float32 copies) to fit HBM; unrolled blocks still can. Measured on
# DeltaTok ViT-B (12 + 12 blocks, 513 tokens, batch 8, bf16): the scan keeps 7.97 GiB of residuals with
# "none", 1.95 GiB with SCANNED_REMAT (weight matmul outputs kept; attention's QK^T / AV and the
# elementwise work recomputed, ~4% more FLOPs), 0.85 with "full".
DEFAULT_REMAT = "auto"
SCANNED_REMAT = "dots_with_no_batch_dims_saveable"


def check_remat(name: str | None) -> str:
    """The remat policy name (None / "" mean "none"; "auto" see DEFAULT_REMAT), with a clear error for an
    unknown one."""
    name = name or "none"
    if name != "auto" and name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)} and 'auto'")
    return name


# Logical axis name of the leading (layer) axis of a BlockStack's parameters. The mesh rules
# (configs/common.py) map it to no mesh axis: each device holds its shard of every layer, and the scan
# slices layer i of that shard.
LAYER_AXIS = "layers"
# The attribute of a BlockStack holding the stacked block: parameter paths read
# `encoder_blocks.stacked.mlp.up_proj.kernel` ([L, in, out]) where the per-layer layout has
# `encoder_blocks.3.mlp.up_proj.kernel` ([in, out]); pretrained/common.py converts between the two.
STACKED = "stacked"


class BlockStack(nnx.Module):
    """`num_layers` identical blocks stored as ONE block whose every parameter has a leading layer axis
    (logical name LAYER_AXIS): [L, in, out] kernels, [L, d] norms. Built with nnx.vmap over the block's
    constructor (each layer its own random init, from split rngs), run by `run_blocks` with nnx.scan.

    Why: a train step's program is mostly per-parameter-leaf work (AdamW, clipping, gradient norms,
    shardings; ~76 StableHLO ops per leaf, benchmarks/RESULTS.md), so a stack of L blocks of n leaves
    costs L * n leaves per-layer, n stacked, and compiles that much faster. The per-layer layout
    (`nnx.List` of blocks, the official checkpoints' names) stays the models' default; see make_blocks."""

    def __init__(self, num_layers: int, make_block: Callable[[nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"a BlockStack needs at least one layer, got {num_layers}")
        self.num_layers = int(num_layers)

        @nnx.split_rngs(splits=self.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=self.num_layers,
                  transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        def make(rngs):
            return make_block(rngs)

        setattr(self, STACKED, make(rngs))

    def __len__(self) -> int:
        return self.num_layers


def make_blocks(num_layers: int, make_block: Callable[[nnx.Rngs], nnx.Module], *, stacked: bool,
                rngs: nnx.Rngs) -> nnx.List | BlockStack:
    """A stack of `num_layers` identical blocks, `make_block(rngs)` each: per-layer modules (an nnx.List;
    parameter paths `blocks.3.mlp...` as in the official checkpoints; the models' default) or, with
    `stacked`, one BlockStack (`blocks.stacked.mlp...`, [L, ...]; the recipe configs' choice, for short
    compiles). run_blocks runs the first unrolled, the second as one scan; both compute the same
    function, and weight import fills either (pretrained/common.py)."""
    if stacked:
        return BlockStack(num_layers, make_block, rngs=rngs)
    return nnx.List([make_block(rngs) for _ in range(num_layers)])


def run_blocks(blocks: nnx.List | BlockStack, hidden: Array, *broadcast, remat: str = "none", **static) -> Array:
    """hidden -> blocks[-1](... blocks[0](hidden, *broadcast) ...), for either layout of make_blocks.

    A BlockStack runs as ONE `nnx.scan` over its stacked parameters: the block is traced and compiled
    once, not once per layer (the recipe's layout: short compiles). Per-layer blocks (an nnx.List) run one
    after the other, unrolled: no copy of their parameters into a stack (and of the gradients back) in
    every step, and XLA schedules and fuses across layers (the fastest for small models and on CPU; the
    models' default). `broadcast` arguments (RoPE tables, masks, key/value tokens) go unchanged to every
    layer. `static` keyword arguments (strings) are closed over. `remat` (REMAT_POLICIES, or "auto": see
    DEFAULT_REMAT) puts each block under `nnx.remat`."""
    remat = check_remat(remat)
    stacked = isinstance(blocks, BlockStack)
    if remat == "auto":
        remat = SCANNED_REMAT if stacked and len(blocks) > 1 else "none"

    def layer(x, block, *consts):
        # The carry stays split by batch over the mesh in context (see sharding.constrain_batch).
        return sharding_lib.constrain_batch(block(x, *consts, **static))

    if remat != "none":
        # prevent_cse=False inside a scan: XLA cannot merge the recompute into the forward pass anyway;
        # unrolled blocks keep jax's default.
        layer = nnx.remat(layer, policy=REMAT_POLICIES[remat], prevent_cse=not stacked)
    hidden = sharding_lib.constrain_batch(hidden)
    # The transforms run on fresh modules made here, never on the blocks themselves: those may belong to
    # an outer trace (a predictor merged outside the best-of-K lax.scan), and nnx.remat / nnx.scan write
    # their state back into the modules they are given.
    if stacked:
        # transform_metadata: inside the scan a layer's Variables carry their per-layer logical axes.
        run = nnx.scan(layer, in_axes=(nnx.Carry, 0) + (None,) * len(broadcast), out_axes=nnx.Carry,
                       transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        return run(hidden, _fresh(getattr(blocks, STACKED)), *broadcast)
    for block in blocks:
        hidden = layer(hidden, _fresh(block), *broadcast)
    return hidden


def _fresh(module: nnx.Module) -> nnx.Module:
    """`module` rebuilt with new Variables (the same values) in the current trace."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
