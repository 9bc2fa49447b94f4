"""LayerNorm forward + backward on XLA:CPU: the package's hand-written gradient (`basic_layers.layer_norm_f32`, a
custom_vjp) against autodiff of the same two-pass forward (what `basic_layers.LayerNorm` did before), interleaved.

    python benchmarks/layernorm_grad.py [--shape=16,129,192] [--norms=8] [--rounds=3] [--calls=50]

`--norms` LayerNorms are stacked with residual connections (as in a block stack), so each program has several
of them; the loss is a fixed random projection of the output. Prints ms per gradient call for each side, per
round, the largest relative difference of the gradients, and the machine load."""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from deltaworld_jax.models import basic_layers

EPS = 1e-5


def autodiff_layer_norm(x, weight, bias):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + EPS) * weight + bias


def hand_written_layer_norm(x, weight, bias):
    return basic_layers.layer_norm_f32(x, weight, bias, EPS)


def gradient_program(norm, num_norms: int, cotangent):
    def loss(x, weight, bias):
        y = x
        for _ in range(num_norms):
            y = y + 0.5 * norm(y, weight, bias)
        return jnp.sum(y * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16,129,192", help="the activations' shape; the last axis is normalised")
    parser.add_argument("--norms", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape) * 3 + 1
    weight, bias = jax.random.normal(keys[1], shape[-1:]), jax.random.normal(keys[2], shape[-1:])
    cotangent = jax.random.normal(keys[3], shape)
    programs = {name: gradient_program(norm, args.norms, cotangent)
                for name, norm in (("autodiff", autodiff_layer_norm), ("hand-written", hand_written_layer_norm))}
    grads = {name: jax.block_until_ready(program(x, weight, bias)) for name, program in programs.items()}
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                for a, b in zip(grads["autodiff"], grads["hand-written"]))
    print(f"shape {shape}, {args.norms} stacked norms; largest relative gradient difference {worst:.2e}; "
          f"load {os.getloadavg()[0]:.2f}")
    for round_index in range(args.rounds):
        times = {}
        for name, program in programs.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = program(x, weight, bias)
            jax.block_until_ready(out)
            times[name] = (time.perf_counter() - start) / args.calls * 1e3
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items())
              + f" (autodiff / hand-written {times['autodiff'] / times['hand-written']:.1f}x); "
              f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
