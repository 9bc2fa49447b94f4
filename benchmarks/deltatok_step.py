"""DeltaTok: the ViT-B parameter count (built abstractly) and the median step time of a tiny config on this
machine. A script that prints numbers, not a timed test:

    JAX_PLATFORMS=cpu python benchmarks/deltatok_step.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig, default_intermediate_size  # noqa: E402
from deltaworld_jax.models.dinov3 import DINOv3, DINOv3Config  # noqa: E402
from deltaworld_jax.models.basic_layers import count_params  # noqa: E402
from deltaworld_jax.tasks import deltatok as deltatok_task  # noqa: E402


def vitb_param_count() -> int:
    """Parameters of the released DeltaTok (two 12-block stacks, hidden 768, 12 heads, SwiGLU 2048)."""
    return count_params(nnx.eval_shape(lambda: DeltaTok(DeltaTokConfig(), rngs=nnx.Rngs(0))))


def median_step_seconds(*, hidden: int = 64, heads: int = 4, depth: int = 2, batch: int = 4,
                        frame_hw: tuple[int, int] = (32, 32), patch: int = 8, steps: int = 20) -> float:
    """Median wall time of one jitted train step (VFM forward + DeltaTok forward/backward + AdamW with the
    official clip 0.01) on a tiny config, after one warm-up step."""
    vfm = DINOv3(DINOv3Config(patch_size=patch, hidden_size=hidden, num_layers=depth, num_heads=heads,
                              intermediate_size=4 * hidden), rngs=nnx.Rngs(1))
    model = DeltaTok(DeltaTokConfig(hidden_size=hidden, num_heads=heads, num_layers=depth,
                                    intermediate_size=default_intermediate_size(True, 4 * hidden)),
                     rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(0.01), optax.adamw(1e-3, weight_decay=0.01))
    opt_state = tx.init(params)
    frames = jax.random.randint(jax.random.key(0), (batch, 2, *frame_hw, 3), 0, 256).astype(jnp.uint8)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            return deltatok_task.reconstruction_loss(nnx.merge(graphdef, p), vfm, frames, rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, loss = step(params, opt_state, jax.random.key(0))
    jax.block_until_ready(loss)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, jax.random.key(i + 1))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"DeltaTok ViT-B parameters: {vitb_param_count():,}")
    print(f"tiny step (hidden 64, 2+2 blocks, batch 4, 32x32 frames, patch 8) on {jax.devices()[0].platform}: "
          f"median {1e3 * median_step_seconds():.2f} ms over 20 steps")
