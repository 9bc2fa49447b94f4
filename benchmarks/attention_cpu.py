"""Attention forward and forward + backward on XLA:CPU at the side-by-side's shapes: jax.nn's XLA path (what
"xla" ran on every backend before session 14), the package's CPU form (`attention._heads_major_attention`,
what "xla" runs on CPU now) and, when torch is installed, torch's scaled_dot_product_attention.

    python benchmarks/attention_cpu.py [--shapes=16x69,8x139,32x69] [--heads=3] [--head_dim=64] [--rounds=3]

Shapes are batch x tokens (69 = 64 patches of a 128x128 frame + CLS + 4 registers; 139 = DeltaTok's encoder
over a frame pair). Prints ms per call for each side and round (the median of `--calls` calls), the largest
difference of the outputs and gradients from jax.nn's, and the machine load. Isolated attention is not the
step: the side-by-side rows gain less than these kernels (benchmarks/step_time_ab.py measures the steps)."""

from __future__ import annotations

import argparse
import os
import sys

# XLA:CPU whatever jax's build would choose (a GPU or TPU build defaults to its accelerator); before jax starts.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.official_side_by_side import timed  # noqa: E402
from deltaworld_jax.models import attention  # noqa: E402


def per_call_ms(fn, calls: int) -> float:
    """Median ms of `calls` calls of `fn` (after 3 warm-up calls), each waited for."""
    return float(np.median(timed(lambda: jax.block_until_ready(fn()), calls, warmup=3)))


def jax_sides(scale: float) -> dict:
    return {
        "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla"),
        "heads-major (ours)": lambda q, k, v: attention._heads_major_attention(q, k, v, None, scale),
    }


def torch_side(q, k, v, g, threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tq, tk, tv = (torch.tensor(np.asarray(x).transpose(0, 2, 1, 3)).requires_grad_() for x in (q, k, v))
    tg = torch.tensor(np.asarray(g).transpose(0, 2, 1, 3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            return sdpa(tq, tk, tv)

    def forward_backward():
        return torch.autograd.grad(sdpa(tq, tk, tv), (tq, tk, tv), tg)

    grads = [x.numpy().transpose(0, 2, 1, 3) for x in forward_backward()]
    return forward, forward_backward, [forward().numpy().transpose(0, 2, 1, 3)] + grads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16x69,8x139,32x69", help="comma-separated batch x tokens")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    for shape in args.shapes.split(","):
        try:
            batch, tokens = (int(x) for x in shape.split("x"))
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not <batch>x<tokens>")
        rng = np.random.default_rng(0)
        q, k, v, g = (jnp.asarray(rng.standard_normal((batch, tokens, args.heads, args.head_dim)), jnp.float32)
                      for _ in range(4))
        sides = {}
        for name, fn in jax_sides(args.head_dim ** -0.5).items():
            forward = jax.jit(fn)
            backward = jax.jit(lambda q, k, v, g, fn=fn: (lambda out, vjp: (out,) + vjp(g))(*jax.vjp(fn, q, k, v)))
            sides[name] = (lambda f=forward: f(q, k, v), lambda b=backward: b(q, k, v, g),
                           [np.asarray(x) for x in backward(q, k, v, g)])
        if (torch_fns := torch_side(q, k, v, g, args.torch_threads)) is not None:
            sides["torch sdpa"] = torch_fns
        reference = sides["jax.nn xla"][2]
        print(f"\n[{batch}, {tokens}, {args.heads}, {args.head_dim}]:")
        for name, (forward, forward_backward, values) in sides.items():
            error = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30)) for a, b in zip(values, reference))
            fw = [per_call_ms(forward, args.calls) for _ in range(args.rounds)]
            fb = [per_call_ms(forward_backward, args.calls) for _ in range(args.rounds)]
            print(f"  {name:20s} forward {' '.join(f'{t:6.3f}' for t in fw)} ms   forward+backward "
                  f"{' '.join(f'{t:6.3f}' for t in fb)} ms   max rel. diff vs jax.nn {error:.1e}")
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
