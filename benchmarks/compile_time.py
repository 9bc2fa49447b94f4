"""Lower + compile time of the real train step, BEFORE and AFTER a change, measured in one run.

Each measurement runs in a fresh subprocess with no persistent compilation cache, with PYTHONPATH set to
one checkout of the package: "before" is a `git worktree` of `--before` (a commit) made in a temporary
folder, "after" this checkout, or a worktree of `--after` (a commit: the measured code cannot change
while a long run goes on). Cases:
  tiny_<kind>      configs/tiny.py:<kind> (deltatok, deltaworld, dinoworld): the test configs' train step
                   on the local CPU (one device)
  tok256_v5e_2x2   configs/kinetics.py:stage=deltatok_256 compiled ahead of time for TPU v5e:2x2 (FSDP,
                   per-chip batch 8; needs libtpu, no TPU), as benchmarks/run_aot.sh does
  tok512_v5e_2x2 / world512_v5e_2x2   the 512px DeltaTok stage (batch 2) and DeltaWorld (batch 2)

    nice -n 15 python benchmarks/compile_time.py --before=0eb11f7 --cases=tiny_deltatok,tok256_v5e_2x2 \
        --repeat=1 --json_out=benchmarks/results/compile_time.json

Prints one table (seconds: lower, compile, total; for TPU cases also the compiled program's memory per
device) and writes every row to --json_out. Only measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "tiny_deltatok": ("configs/tiny.py:deltatok", None, None),
    "tiny_deltaworld": ("configs/tiny.py:deltaworld", None, None),
    "tiny_dinoworld": ("configs/tiny.py:dinoworld", None, None),
    "tok256_v5e_2x2": ("configs/kinetics.py:stage=deltatok_256", "v5e:2x2", 8),
    "tok512_v5e_2x2": ("configs/kinetics.py:stage=deltatok_512", "v5e:2x2", 2),
    "world512_v5e_2x2": ("configs/kinetics.py:stage=deltaworld_512", "v5e:2x2", 2),
}

# Runs inside the measured checkout: the AOT program API lives in deltaworld_jax.aot since the 'one house'
# layout (main after 0102b92) and in deltaworld_jax.bench.{program,aot} before it; either side may be either.
WORKER = textwrap.dedent('''
    import json, sys, time
    spec, topology, batch, remat = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("measured_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    remat = None if remat == "-" else remat
    memory_gib = None
    try:
        from deltaworld_jax import aot
        program = aot
    except ImportError:
        from deltaworld_jax.bench import aot, program
    if topology == "-":
        from deltaworld_jax import sharding as sharding_lib
        cfg = program.benchmark_config(config, remat=remat)
        mesh = sharding_lib.make_mesh(cfg.mesh)
        t0 = time.perf_counter()
        lowered = program.lower_train_step(cfg, mesh)[0]
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - t0
    else:
        r = aot.compile_on_topology(config, topology, sharding="fsdp", per_chip_batch=int(batch), remat=remat,
                                    count_flops=False)
        lower_s, compile_s = r["lower_seconds"], r["compile_seconds"]
        memory_gib = r["memory"]["total"] / 2**30
    print("RESULT " + json.dumps({"lower_s": lower_s, "compile_s": compile_s, "memory_gib": memory_gib}))
''')


def measure(checkout: str, case: str, remat: str | None, timeout: int) -> dict:
    spec, topology, batch = CASES[case]
    env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               JAX_ENABLE_COMPILATION_CACHE="false", JAX_COMPILATION_CACHE_DIR="")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = run_worker(WORKER, [spec, topology or "-", str(batch or 0), remat or "-"], cwd=checkout, env=env,
                   timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if "error" not in r:
        r["total_s"] = r["lower_s"] + r["compile_s"]
        # CPU seconds of the whole measured process (imports, build, lower, compile; all threads): on a
        # shared host the wall-clock seconds follow the load, the CPU seconds much less.
        r["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r


def run_worker(code: str, args: list[str], *, cwd: str | None, env: dict, timeout: int) -> dict:
    """`python -c code *args` in a fresh process: the JSON its stdout printed after "RESULT ", else
    {"error": the end of its output, or the timeout}. The measuring scripts' one way to run a measurement."""
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


@contextlib.contextmanager
def checkout_of(commit: str):
    """A temporary `git worktree` of `commit` (removed afterwards)."""
    folder = tempfile.mkdtemp(prefix="compile_time_before_")
    subprocess.run(["git", "worktree", "add", "--detach", folder, commit], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", folder], cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="", help="commit to compare against (empty: only this checkout)")
    parser.add_argument("--after", default="", help="commit measured as 'after' (empty: this checkout as it is)")
    parser.add_argument("--cases", default="tiny_deltatok,tiny_deltaworld,tiny_dinoworld",
                        help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--sides", default="before,after", help="which sides to run (before, after)")
    parser.add_argument("--remat", default="", help="remat policy override for every case (default: the config's)")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--repeat", type=int, default=1,
                        help="measurements per case and side (the table shows each; on a shared host take the min)")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
    sides = [s for s in args.sides.split(",") if s]
    rows = []
    with contextlib.ExitStack() as stack:
        checkouts = {"after": stack.enter_context(checkout_of(args.after)) if args.after else ROOT}
        if "before" in sides:
            if not args.before:
                parser.error("--sides includes before: give --before=<commit>")
            checkouts["before"] = stack.enter_context(checkout_of(args.before))
        for case in cases:
            for repeat in range(args.repeat):  # before and after interleaved: load on the host hits both
                for side in sides:
                    load_start = os.getloadavg()[0]
                    r = measure(checkouts[side], case, args.remat or None, args.timeout)
                    # The host's 1-minute load average at the start and end: a shared host's load moves the
                    # seconds by tens of percent, so every row says what it ran beside.
                    r.update(load_start=round(load_start, 2), load_end=round(os.getloadavg()[0], 2))
                    r.update(case=case, side=side, repeat=repeat,
                             commit=args.before if side == "before" else (args.after or "HEAD"))
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print("\n| case | side | lower s | compile s | total s | process CPU s | memory GiB/device | load start/end |\n"
          "|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['side']} | error | {r['error'].splitlines()[-1][:60]} | | | | | |")
        else:
            memory = f"{r['memory_gib']:.2f}" if r.get("memory_gib") is not None else ""
            print(f"| {r['case']} | {r['side']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['total_s']:.1f} | "
                  f"{r['process_cpu_s']:.1f} | {memory} | {r['load_start']} / {r['load_end']} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
