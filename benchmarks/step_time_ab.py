"""Our CPU step time BEFORE and AFTER a change: the side-by-side's steps, interleaved in fresh processes.

    python benchmarks/step_time_ab.py --before=<commit> [--after=<commit>] [--rows=deltatok,dinoworld] \
        [--pairs=3] [--steps=8] [--json_out=...]

Each measurement is one fresh process (PYTHONPATH = that checkout) that builds a row of
`benchmarks/official_side_by_side.py` (`build_ours(row, "float32")`: the same configuration, batch and data
as the side-by-side table), runs 2 warm-up steps and `--steps` timed ones. "before" is a `git worktree` of
`--before`, "after" this checkout as it is or a worktree of `--after`. The pairs alternate their order
(before-after, after-before, ...) so a drift of the host's load hits both sides.

A change to a 2-core host's step time of under ~10% is inside one process's spread, so a verdict needs several
pairs: the table prints every pair's median and minimum, the first loss of each side (the same numbers
on both sides unless the change alters the function), the 1-minute load at each start, and per row the
median over pairs of after / before. Only measures; prints no verdict of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.compile_time import ROOT, checkout_of, run_worker  # noqa: E402

ROWS = ("deltatok", "deltaworld", "dinoworld", "forecast")

# Runs inside the measured checkout.
WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from benchmarks.official_side_by_side import build_ours, timed
    row, steps = sys.argv[1], int(sys.argv[2])
    count, compile_s, step, flops = build_ours(row, "float32")
    first = np.asarray(step()).ravel()
    times = timed(step, steps, warmup=2)
    print("RESULT " + json.dumps({"median_ms": float(np.median(times)), "min_ms": float(min(times)),
                                  "compile_s": compile_s, "first_loss": float(first[0]), "params": count}))
''')


def measure(checkout: str, row: str, steps: int, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu")
    return run_worker(WORKER, [row, str(steps)], cwd=checkout, env=env, timeout=timeout)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--after", default="", help="commit measured as 'after' (empty: this checkout as it is)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {ROWS}")
    parser.add_argument("--pairs", type=int, default=3, help="before/after pairs per row")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process (after 2 warm-up steps)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--json_out", default="")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown rows {unknown}; known: {ROWS}")
    if args.pairs < 1 or args.steps < 1:
        parser.error("--pairs and --steps must be at least 1")
    results = []
    with contextlib.ExitStack() as stack:
        checkouts = {"before": stack.enter_context(checkout_of(args.before)),
                     "after": stack.enter_context(checkout_of(args.after)) if args.after else ROOT}
        for row in rows:
            for pair in range(args.pairs):
                for side in ("before", "after") if pair % 2 == 0 else ("after", "before"):
                    load = os.getloadavg()[0]
                    r = measure(checkouts[side], row, args.steps, args.timeout)
                    r.update(row=row, pair=pair, side=side, load_start=round(load, 2),
                             commit=args.before if side == "before" else (args.after or "HEAD"))
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print("\n| row | pair | side | median ms | min ms | first loss | load at start |\n|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | {r['pair']} | {r['side']} | error: {r['error'].splitlines()[-1][:60]} | | | |")
        else:
            print(f"| {r['row']} | {r['pair']} | {r['side']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                  f"{r['first_loss']:.6g} | {r['load_start']} |")
    print("\n| row | before: medians over pairs | after | median of after / before per pair |\n|---|---|---|---:|")
    for row in rows:
        by_pair = {}
        for r in results:
            if r["row"] == row and "error" not in r:
                by_pair.setdefault(r["pair"], {})[r["side"]] = r["median_ms"]
        complete = [p for p in by_pair.values() if len(p) == 2]
        before = ", ".join(f"{p['before']:.1f}" for p in complete)
        after = ", ".join(f"{p['after']:.1f}" for p in complete)
        ratio = f"{statistics.median(p['after'] / p['before'] for p in complete):.3f}" if complete else "n/a"
        print(f"| {row} | {before} | {after} | {ratio} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
