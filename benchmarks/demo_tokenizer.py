"""Does a small DeltaTok learn to use its token? The measurement behind configs/demo.py's VFM and world.

    JAX_PLATFORMS=cpu python benchmarks/demo_tokenizer.py --steps=1000 --position_channels=16 \
        --initial_shapes=2 --speed=0.4,0.7

trains DeltaTok ALONE (squared error, AdamW with the demo's lr and warm-up, no trainer, no checkpoints) on
frame pairs of the synthetic world rendered once up front (0.2 s apart, 32x32, 4x4 patches), and prints
every --every steps the reconstruction error of held-out pairs with
  own     the pair's own token,
  other   another pair's token (the tokens rolled by one),
  copy    no model (the previous frame),
and the spread of the tokens over the pairs. own ~ other means the decoder ignores its token: every gain
over copy is a blur. benchmarks/demo.md has the numbers. A script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deltaworld_jax.data.synthetic import SyntheticWorld, SyntheticWorldConfig
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.dinov3 import PixelPatchVFM


def render_pairs(world: SyntheticWorld, count: int, size: int, dt: float, seed: int) -> np.ndarray:
    """uint8 [count, 2, size, size, 3]: clip i at a random time in [0, 3) s and dt later."""
    rng = np.random.default_rng(seed)
    pairs = np.zeros((count, 2, size, size, 3), np.uint8)
    for i in range(count):
        start = rng.uniform(0.0, 3.0)
        for k, state in enumerate(world.states_at(i, [start, start + dt])):
            pairs[i, k] = world.render(state, size, size)
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--position_channels", type=int, default=16, help="0: pixels only")
    p.add_argument("--initial_shapes", type=int, default=2)
    p.add_argument("--speed", default="0.4,0.7", help="world heights per second (min,max)")
    p.add_argument("--event_rate", type=float, default=1.5)
    p.add_argument("--train_pairs", type=int, default=20000)
    p.add_argument("--test_pairs", type=int, default=256)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float]:
    size, patch, dt = 32, 4, 0.2
    speed = tuple(float(s) for s in args.speed.split(","))
    world_config = SyntheticWorldConfig(initial_shapes=args.initial_shapes, speed_range=speed, radius_range=(0.12, 0.22),
                               event_rate=args.event_rate)
    t0 = time.perf_counter()
    train = render_pairs(SyntheticWorld(world_config, seed=0), args.train_pairs, size, dt, seed=1)
    test = jnp.asarray(render_pairs(SyntheticWorld(world_config, seed=777), args.test_pairs, size, dt, seed=2))
    print(f"rendered {args.train_pairs} + {args.test_pairs} pairs in {time.perf_counter() - t0:.1f} s", flush=True)

    vfm = PixelPatchVFM(patch, num_position_channels=args.position_channels)
    # The demo's DeltaTok: the VFM's width in heads of 16, two blocks per stack, SwiGLU 128, layer-scale 0.1.
    model = DeltaTok(DeltaTokConfig(hidden_size=vfm.hidden_size, num_heads=vfm.hidden_size // 16, num_layers=2,
                                    intermediate_size=128, layer_scale_init=0.1), rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(lambda c: args.lr * jnp.minimum(c / max(args.warmup, 1), 1.0), weight_decay=0.01)
    opt_state = tx.init(params)
    grid = (size // patch, size // patch)

    def encode(params, frames, rng):
        m = nnx.merge(graphdef, params)
        feats = vfm(frames)
        rope = m.rope(grid, rng)
        x, y = feats[:, 0], feats[:, 1]
        return m, x, y, m.encode(x, y, rope), rope

    @jax.jit
    def step(params, opt_state, frames, rng):
        def loss_fn(p):
            m, x, y, z, rope = encode(p, frames, rng)
            return jnp.mean(jnp.square(m.decode(z, x, rope) - y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, frames):
        m, x, y, z, rope = encode(params, frames, None)
        error = lambda token: jnp.mean(jnp.square(m.decode(token, x, rope) - y))
        return {"own": error(z), "other": error(jnp.roll(z, 1, axis=0)), "copy": jnp.mean(jnp.square(x - y)),
                "token_spread": jnp.mean(jnp.std(z, axis=0))}

    rng = np.random.default_rng(args.seed)
    result, start = {}, time.perf_counter()
    for i in range(1, args.steps + 1):
        batch = jnp.asarray(train[rng.integers(0, len(train), args.batch)])
        params, opt_state, loss = step(params, opt_state, batch, jax.random.key(i))
        if i % args.every == 0 or i == args.steps:
            result = {k: float(v) for k, v in evaluate(params, test).items()}
            print(f"step {i}: train loss {float(loss):.4f}  own {result['own']:.4f}  other {result['other']:.4f}  "
                  f"copy {result['copy']:.4f}  token spread {result['token_spread']:.3f}  "
                  f"({i / (time.perf_counter() - start):.1f} steps/s)", flush=True)
    return result


if __name__ == "__main__":
    run(parse_args())
