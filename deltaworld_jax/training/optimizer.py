"""The official optimiser recipe as optax transformations.

  * AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8 added outside the square root, decoupled
    weight decay scaled by the learning rate: p <- p - lr * (adam_update + wd * p)).
  * Weight decay ONLY on Linear/Conv weight matrices (`kernel` of nnx.Linear / nnx.LinearGeneral /
    nnx.Conv / nnx.ConvTranspose), as the official `configure_optimizers`: no decay on biases, norms,
    LayerScale, learned embeddings/tokens.
  * Linear warm-up from 0: lr(step) = base_lr * step / warmup for step < warmup, then constant (the
    official LambdaLR reads the optimiser-step counter, so the first update uses lr 0).
  * Global-norm gradient clipping (0.01 for DeltaTok; 0 disables it).

The schedule depends only on optax's update counter, which a full resume restores, so a cool-down stage
that resumes a run with a lower `optim.lr` continues the step count and uses its own lr (as the official
`on_train_start` re-applies the configured lr after a resume). The optimiser only ever sees the TRAINABLE
parameters: frozen modules are separate arguments of the step and never reach it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Modules whose `kernel` is a weight matrix in the official sense (torch Linear / ConvNd / ConvTransposeNd).
DECAYED_MODULE_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose)


def learning_rate_schedule(base_lr: float, warmup_steps: int) -> optax.Schedule:
    """base_lr * min(step / warmup, 1); constant base_lr when warmup_steps == 0."""
    if warmup_steps <= 0:
        return optax.constant_schedule(base_lr)

    # Not optax.linear_schedule(0, base_lr, warmup): it computes base_lr - base_lr * (1 - step / warmup), which
    # loses ~1e-5 of the rate to cancellation in the first steps; this is the plain product.
    def schedule(count):
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / warmup_steps, 1.0)
        return base_lr * frac

    return schedule


def weight_decay_mask(module: nnx.Module) -> dict:
    """Pure nested dict (the layout of `nnx.to_pure_dict(nnx.state(module, nnx.Param))`) of bools: True for
    the weight matrix of every Linear/Conv module, False for everything else. Works on abstract modules."""
    decayed: set[tuple] = set()
    for path, node in nnx.iter_graph(module):
        if isinstance(node, DECAYED_MODULE_TYPES):
            decayed.add(tuple(path) + ("kernel",))
    params = nnx.state(module, nnx.Param)
    flat = [(path, tuple(path) in decayed) for path, _ in nnx.to_flat_state(params)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat)) if flat else {}


def make_optimizer(optim_config, decay_mask: Any) -> optax.GradientTransformation:
    """AdamW + decoupled weight decay on `decay_mask` + warm-up/constant lr + global-norm clipping."""
    schedule = learning_rate_schedule(optim_config.lr, optim_config.warmup_steps)
    parts = []
    if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask,
        ))
    return optax.chain(*parts)


def update_count(opt_state) -> jax.Array:
    """The number of updates applied so far (the schedule's step), read from the adam state."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(leaf, optax.ScaleByAdamState):
            return leaf.count
    raise ValueError("No Adam state found in the optimiser state")


def global_norm_by_module(grads: dict) -> dict[str, jax.Array]:
    """{'total': global L2 norm, <top-level child>: its L2 norm} of a pure-dict gradient tree (the official
    run logs the same per `named_children()` of the network)."""
    norms = {"total": optax.tree.norm(grads)}
    for name, sub in grads.items():
        if jax.tree.leaves(sub):
            norms[str(name)] = optax.tree.norm(sub)
    return norms
