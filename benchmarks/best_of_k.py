"""DeltaWorld: memory and time of the compiled train step (tokens -> best-of-K -> loss -> grads -> AdamW
update) for several K. A script that prints numbers, not a timed test:

    JAX_PLATFORMS=cpu python benchmarks/best_of_k.py --tiny --ks=1,16,64
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig  # noqa: E402
from deltaworld_jax.models.basic_layers import count_params  # noqa: E402


def benchmark_best_of_k(
    ks: tuple[int, ...] = (1, 256),
    *,
    batch_size: int = 2,
    num_frames: int = 8,
    bom_chunk: int | None = 64,
    steps: int = 2,
    model_overrides: dict | None = None,
) -> dict[int, dict[str, float]]:
    """Compile and time the DeltaWorld train step (tokens -> best-of-K -> loss -> grads -> AdamW update) for
    each K on the default device. Returns {K: {param_count, argument_bytes, temp_bytes, output_bytes, peak_bytes
    (temp + argument), compile_s, step_s}}; step_s is the mean of `steps` timed steps after a warm-up."""
    results = {}
    for k in ks:
        chunk = None if not bom_chunk else min(bom_chunk, k)
        cfg = DeltaWorldConfig(**{**(model_overrides or {}), "num_samples_train": k, "bom_chunk": chunk})
        model = nnx.jit(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(0)))()
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.4), wrt=nnx.Param)
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.normal(size=(batch_size, num_frames, cfg.backbone_hidden_size)), jnp.float32)
        times = jnp.asarray(np.tile(np.arange(num_frames, dtype=np.float32) * 0.1, (batch_size, 1)))
        graphdef, state = nnx.split((model, optimizer))

        def step(state, tokens, times, key):
            model, optimizer = nnx.merge(graphdef, state)
            (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(tokens, times, key), has_aux=True)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        jitted = jax.jit(step, donate_argnums=0)
        start = time.perf_counter()
        compiled = jitted.lower(state, tokens, times, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        state, loss = compiled(state, tokens, times, jax.random.key(0))
        jax.block_until_ready(loss)
        start = time.perf_counter()
        for i in range(steps):
            state, loss = compiled(state, tokens, times, jax.random.key(i + 1))
        jax.block_until_ready(loss)
        step_s = (time.perf_counter() - start) / steps
        results[k] = {
            "param_count": float(count_params(model)),
            "argument_bytes": float(memory.argument_size_in_bytes),
            "temp_bytes": float(memory.temp_size_in_bytes),
            "output_bytes": float(memory.output_size_in_bytes),
            "peak_bytes": float(memory.temp_size_in_bytes + memory.argument_size_in_bytes),
            "compile_s": compile_s,
            "step_s": step_s,
        }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=benchmark_best_of_k.__doc__)
    parser.add_argument("--ks", default="1,256")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--bom_chunk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="width 64, 2 layers instead of the recipe size")
    args = parser.parse_args(argv)
    overrides = dict(hidden_size=64, num_layers=2, num_heads=2, backbone_hidden_size=64,
                     rope_axis_sizes=(28,)) if args.tiny else {}
    ks = tuple(int(k) for k in args.ks.split(","))
    results = benchmark_best_of_k(ks, batch_size=args.batch_size, num_frames=args.num_frames,
                                  bom_chunk=args.bom_chunk, steps=args.steps, model_overrides=overrides)
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch_size} x {args.num_frames} frames; "
          f"bom_chunk {args.bom_chunk}; predictor params {int(results[ks[0]]['param_count']):,}")
    base = results[ks[0]]["peak_bytes"]
    for k, r in results.items():
        print(f"K={k:4d}: peak (temp + arguments) {r['peak_bytes'] / 2**20:8.1f} MiB "
              f"(temp {r['temp_bytes'] / 2**20:.1f}, arguments {r['argument_bytes'] / 2**20:.1f}) "
              f"= {r['peak_bytes'] / base:.2f}x K={ks[0]}; step {r['step_s'] * 1e3:.0f} ms; "
              f"compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
