"""Does a token count that is not a multiple of 8 (or 128) make the TPU compile slower? One fresh process per
count, each compiling the same plain-JAX ViT-B train step for v5e:2x2 ahead of time (needs libtpu, no TPU).

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/token_count_compile.py [--tokens=261,264,513,520,512]

The program: 12 pre-norm ViT-B blocks (width 768, 12 heads, MLP 3072, bf16 attention) scanned over stacked
weights, each under remat `dots_with_no_batch_dims_saveable` (the recipe's scanned-stack policy), value and
gradient of a scalar loss, global batch 32 split over the 4 chips. 261 and 513 are the token counts of the
256px and 512px ViTs (patches + CLS + 4 registers); 264 and 520 are the next multiples of 8. Prints per count
the lower and compile seconds, the process's CPU seconds and the compiled temporaries. It only measures:
the package pads nothing (see benchmarks/RESULTS.md, session 14, for the numbers and why).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.compile_time import run_worker  # noqa: E402

WORKER = textwrap.dedent('''
    import json, resource, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    tokens = int(sys.argv[1])
    width, heads, mlp, layers, batch = 768, 12, 3072, 12, 32
    mesh = Mesh(np.array(topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices), ("data",))

    def norm(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)

    def block(x, p):
        h = norm(x)
        q, k, v = ((h @ p[n]).reshape(batch, tokens, heads, width // heads).astype(jnp.bfloat16) for n in "qkv")
        x = x + jax.nn.dot_product_attention(q, k, v).astype(x.dtype).reshape(batch, tokens, width) @ p["o"]
        return x + jax.nn.gelu(norm(x) @ p["up"]) @ p["down"], None

    body = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    def loss(params, x):
        return (jax.lax.scan(body, x, params)[0] ** 2).mean()

    shapes = {n: (layers, width, width) for n in "qkvo"} | {"up": (layers, width, mlp), "down": (layers, mlp, width)}
    params = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, P())) for n, s in shapes.items()}
    x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    t0 = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"tokens": tokens, "lower_s": t1 - t0, "compile_s": t2 - t1,
                                  "process_cpu_s": usage.ru_utime + usage.ru_stime,
                                  "temporaries_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30}))
''')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="261,264,513,520,512", help="comma-separated token counts")
    parser.add_argument("--timeout", type=int, default=1200)
    args = parser.parse_args(argv)
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_ENABLE_COMPILATION_CACHE="false")
    print(f"load at the start {os.getloadavg()}")
    print("| tokens | lower s | compile s | process CPU s | temporaries GiB | load at start |\n|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens.split(","):
        load = os.getloadavg()[0]
        r = run_worker(WORKER, [tokens], cwd=None, env=env, timeout=args.timeout)
        if "error" in r:
            print(f"| {tokens} | failed: {r['error'].strip().splitlines()[-1][:80]} | | | | |")
            continue
        print(f"| {tokens} | {r['lower_s']:.2f} | {r['compile_s']:.1f} | {r['process_cpu_s']:.1f} | "
              f"{r['temporaries_gib']:.3f} | {load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
