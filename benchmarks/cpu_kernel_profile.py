"""Where one of our side-by-side CPU steps spends its time, kernel by kernel: a jax.profiler trace of a few
steps of `official_side_by_side.build_ours(row, "float32")`, with XLA:CPU's per-kernel trace events on.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true JAX_PLATFORMS=cpu \
        python benchmarks/cpu_kernel_profile.py [--row=deltatok] [--steps=5] [--top=25]

Prints the kernel time per step grouped by kind (the kernel name without its number: `ynn_fusion` = matmuls run
by YNNPACK, `*_fusion` = XLA's element-wise fusions, `copy`, ...), summed over threads, next to the step's wall
time, and the step's matmul GFLOP/s over the matmul kernels' time alone. Without the XLA flag above no kernel events
are recorded (the script says so)."""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Trace events that are not kernels: Python frames ("$file:line"), the runtime's executor and thread pool.
_NOT_KERNELS = re.compile(r"^\$|Thunk|Pjit|Slinky|Execute|ParseArguments")
# Kernels that run matmuls: YNNPACK's fusions and XLA's own dots.
_MATMUL_KINDS = ("ynn_fusion", "dot", "dot_general")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="deltatok", choices=("deltatok", "deltaworld", "dinoworld", "forecast"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if "xla_cpu_enable_xprof_traceme=true" not in os.environ.get("XLA_FLAGS", ""):
        print("note: XLA_FLAGS lacks --xla_cpu_enable_xprof_traceme=true: no per-kernel events will be recorded")
    import jax

    from benchmarks.official_side_by_side import build_ours

    _, _, step, matmul_flops = build_ours(args.row, "float32")
    for _ in range(3):
        step()
    folder = tempfile.mkdtemp(prefix="cpu_kernel_profile_")
    t0 = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(args.steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    (trace_file,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_kind, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not _NOT_KERNELS.search(e["name"]):
            kind = re.sub(r"[._]\d+$", "", e["name"])
            per_kind[kind] += e["dur"] / 1e3 / args.steps
            calls[kind] += 1 / args.steps
    total = sum(per_kind.values())
    print(f"{args.row}: {wall_ms:.1f} ms per traced step (wall, tracing on), kernels {total:.1f} ms summed over "
          f"threads; load {os.getloadavg()}")
    matmul_ms = sum(per_kind.get(kind, 0.0) for kind in _MATMUL_KINDS)
    if matmul_ms:
        print(f"matmul FLOPs {matmul_flops / 1e9:.1f} G per step: {matmul_flops / matmul_ms / 1e6:.0f} GFLOP/s over "
              f"the matmul kernels' time ({' + '.join(_MATMUL_KINDS)}: {matmul_ms:.1f} ms)")
    print("| kernel kind | ms per step | share | kernels per step |\n|---|---:|---:|---:|")
    for kind, ms in per_kind.most_common(args.top):
        print(f"| {kind} | {ms:.2f} | {100 * ms / total:.1f}% | {calls[kind]:.0f} |")


if __name__ == "__main__":
    main()
