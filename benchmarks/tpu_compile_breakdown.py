"""Where a TPU ahead-of-time compile spends its time: XLA's HLO passes vs the TPU backend's per-kernel code
generation, and which kernels (and which while-loop bodies of the program) the backend spends it on.
Parses the log of a compile run with libtpu's own statistics switched on; compiles nothing itself.

    XLA_FLAGS=--xla_dump_to=/tmp/dump TPU_STDERR_LOG_LEVEL=0 TPU_MIN_LOG_LEVEL=0 \
    LIBTPU_INIT_ARGS="--xla_jf_print_compilation_stats=true --xla_tpu_impure_dump_lowering_stats=true" \
    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m benchmarks.benchmark aot \
        --config=configs/kinetics.py:stage=deltatok_256 --topology=v5e:2x2 --sharding=fsdp --per_chip_batch=8 \
        > /tmp/aot.log 2>&1
    python -m benchmarks.tpu_compile_breakdown --log=/tmp/aot.log \
        --hlo=/tmp/dump/module_0003.jit_step.<...>.after_optimizations.txt

What libtpu 0.0.42.1 logs: `--xla_jf_print_compilation_stats` the time of every HLO pass and
"HLO_PASSES / BACKEND_PASSES / CODE_GENERATION / END_TO_END stage duration"; the lowering statistics one
line per kernel it lowers to TPU code (LLO): `LLO-STATS: START(us) END(us) HLO(<instruction>) ...
NUM_BUNDLES(n)`, i.e. wall time and size (VLIW bundles) of each kernel. The backend lowers kernels on a
pool of threads, so the summed kernel times exceed the stage's wall time (and include waiting for the CPU
on a loaded host); their SHARES are what this reports. With --hlo (the optimised module XLA dumped), each
kernel is attributed to the computation it sits in: ENTRY (optimiser, metrics) or a while body (the
accumulation loop, the scans over blocks), named by the op that made the loop.
"""

from __future__ import annotations

import argparse
import collections
import re

LLO_STATS = re.compile(r"LLO-STATS: START\((\d+)\) END\((\d+)\) HLO\(([^)]*)\) NUM_RETRIES\((\d+)\) "
                       r"NUM_BUNDLES\((\d+)\)")
STAGE = re.compile(r"(HLO_PASSES|BACKEND_PASSES|CODE_GENERATION|END_TO_END) stage duration: (.*)$")


def kernels(log_path: str) -> list[tuple[str, float, int]]:
    """(HLO instruction, seconds, bundles) of every kernel the backend lowered, in log order."""
    rows = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = LLO_STATS.search(line)
            if m:
                rows.append((m.group(3), (int(m.group(2)) - int(m.group(1))) / 1e6, int(m.group(5))))
    return rows


def stages(log_path: str) -> list[tuple[str, str]]:
    with open(log_path, errors="replace") as f:
        return [(m.group(1), m.group(2).strip()) for m in map(STAGE.search, f) if m]


def computations(hlo_path: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """From an HLO text dump: instruction -> its computation, while body -> the op_name of its while,
    instruction -> its text."""
    where, loops, text = {}, {}, {}
    comp = None
    with open(hlo_path) as f:
        for line in f:
            if not line.startswith(" ") and line.rstrip().endswith("{"):
                m = re.match(r"^(?:ENTRY )?%?([\w.\-]+)", line)
                comp = "ENTRY" if line.startswith("ENTRY") else m.group(1)
                continue
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
            if m and comp:
                where[m.group(1)], text[m.group(1)] = comp, m.group(2)
                if " while(" in line:
                    body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                    op = re.search(r'op_name="([^"]*)"', line)
                    loops[body] = op.group(1) if op else ""
    return where, loops, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="stderr of the compile run (see above)")
    parser.add_argument("--hlo", default="", help="the optimised HLO module XLA dumped (attributes kernels)")
    parser.add_argument("--top", type=int, default=15, help="largest kernels to list")
    args = parser.parse_args()

    for stage, duration in stages(args.log):
        print(f"{stage:16s} {duration}")
    rows = kernels(args.log)
    if not rows:
        raise SystemExit(f"{args.log}: no LLO-STATS lines (run with --xla_tpu_impure_dump_lowering_stats=true)")
    total = sum(t for _, t, _ in rows)
    print(f"\n{len(rows)} kernels lowered, {total:.1f} s summed over threads, {sum(b for *_, b in rows)} bundles")
    where, loops, text = computations(args.hlo) if args.hlo else ({}, {}, {})
    if where:
        print("\nby computation (share of the summed kernel time):")
        by = collections.defaultdict(lambda: [0, 0.0, 0])
        for name, t, b in rows:
            entry = by[where.get(name, "?")]
            entry[0] += 1
            entry[1] += t
            entry[2] += b
        for comp, (n, t, b) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"  {100 * t / total:5.1f}%  {n:4d} kernels {b:7d} bundles  {comp}  {loops.get(comp, '')[-70:]}")
    print(f"\nlargest {args.top} kernels:")
    for name, t, b in sorted(rows, key=lambda r: -r[1])[:args.top]:
        shape = text.get(name, "").split(" ")[0][:60]
        print(f"  {100 * t / total:5.1f}%  {b:6d} bundles  {where.get(name, '')[:28]:28s} {name:28s} {shape}")


if __name__ == "__main__":
    main()
