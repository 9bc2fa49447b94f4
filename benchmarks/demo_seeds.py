"""The embedded demo over seeds: does its point show for every seed, and when does DeltaTok's token switch on?

    JAX_PLATFORMS=cpu python benchmarks/demo_seeds.py --seeds=0,1,2,3,4 --stages=deltatok   # tokenizer stage
    JAX_PLATFORMS=cpu python benchmarks/demo_seeds.py --seeds=0,1,2,3,4                     # the whole demo

runs, per seed, the README's command in a fresh process, as a newcomer does,

    python -m deltaworld_jax.main --config=configs/demo.py --config.seed=S --workdir=<root>/seed_S

(with --stages=deltatok only its first stage), times it, and prints one row per seed from the files the run
writes: from <workdir>/token_check.jsonl (the DeltaTok stage's token check, every --check_every steps) the
step at which the token switches on (the first check where the pair's own token reconstructs at least
--on_margin better than another clip's) and the final own / other-clip / copy-last reconstruction errors;
from <workdir>/demo_results.json (whole demo only) best-of-N / mean-of-N / copy-last one and three steps
ahead, and whether the demo's verdicts (deltaworld_jax/evaluation/demo.py: margins 25% for the token, 5% best vs
mean and vs copy-last) hold. A script that prints numbers, not a test; benchmarks/demo.md has its output.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltaworld_jax.evaluation import demo  # noqa: E402  (after the path: the checkout's package)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--stages", default="", help="'deltatok': the tokenizer stage only; '' the whole demo")
    p.add_argument("--root", default="/tmp/demo_seeds", help="workdirs: <root>/seed_<S> (must not exist yet)")
    p.add_argument("--check_every", type=int, default=100, help="steps between token checks (the demo: 1000)")
    p.add_argument("--on_margin", type=float, default=0.10,
                   help="the token is 'on' once the own token is this much better than another clip's")
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--extra", default="", help="more flags for main, space-separated, e.g. a step count")
    return p.parse_args(argv)


def switch_on_step(checks: list[dict], margin: float) -> int | None:
    """The first checked step from which on the own token stays at least `margin` better than another clip's."""
    step = None
    for check in checks:
        if check["own_vs_other"] >= margin:
            step = check["step"] if step is None else step
        else:
            step = None
    return step


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    workdir = pathlib.Path(args.root) / f"seed_{seed}"
    if workdir.exists():
        raise SystemExit(f"{workdir} exists: a rerun would resume it, not measure a fresh run; pick another --root")
    cmd = [sys.executable, "-m", "deltaworld_jax.main", f"--config={args.config}", f"--config.seed={seed}",
           f"--workdir={workdir}", f"--config.stage_configs.deltatok.eval.every_steps={args.check_every}"]
    if args.stages:
        cmd.append(f"--stages={args.stages}")
    cmd += args.extra.split()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (workdir / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"seed {seed} failed (log: {workdir / 'log.txt'}):\n{proc.stderr[-3000:]}")
    row = {"seed": seed, "wall_s": wall, "load": os.getloadavg()}
    checks = [json.loads(line) for line in (workdir / demo.TOKEN_CHECK_NAME).read_text().splitlines() if line]
    row["checks"] = checks
    row["on_step"] = switch_on_step(checks, args.on_margin)
    row["token"] = checks[-1] if checks else {}
    results = workdir / f"{demo.RESULTS_NAME}.json"
    if results.exists():
        everything = json.loads(results.read_text())
        row["token"] = everything.get("token_use", row["token"])  # the final check, on the world's eval batch
        row["claim"] = {r["setting"]: r for r in everything["claim"]}
    return row


def format_row(row: dict, steps: int) -> str:
    token = row["token"]
    on = row["on_step"] if row["on_step"] is not None else f"not by {steps}"
    cells = [str(row["seed"]), f"{row['wall_s']:.0f} s (load {row['load'][0]:.1f})", str(on)]
    if token:
        cells += [f"{token['own_token']:.4f} / {token['other_clip_token']:.4f} / {token['copy_last']:.4f}",
                  f"{100 * demo.gain(token['own_token'], token['other_clip_token']):.1f}%",
                  "yes" if demo.token_reads(token) else "NO"]
    else:
        cells += ["-", "-", "-"]
    for setting in ("c4_h1", "c4_h3"):
        claim = row.get("claim", {}).get(setting)
        cells.append(f"{claim['best']:.4f} / {claim['mean']:.4f} / {claim['copy_last']:.4f} "
                     f"({100 * claim['best_vs_mean']:.1f}%, {'yes' if claim['holds'] else 'NO'})" if claim else "-")
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {args.config} {'stage ' + args.stages if args.stages else 'whole demo'}, seeds {seeds}, token check "
          f"every {args.check_every} steps, 'on' = own at least {100 * args.on_margin:.0f}% better than other; "
          f"verdict margins: token {100 * demo.TOKEN_MARGIN:.0f}%, best vs mean {100 * demo.BEST_VS_MEAN_MARGIN:.0f}%, "
          f"vs copy-last {100 * demo.VS_COPY_MARGIN:.0f}%", flush=True)
    header = ("| seed | wall | token on at step | own / other / copy | own vs other | reads (>= 25%) "
              "| 1 step: best / mean / copy-last (best vs mean, margins met) | 3 steps: same |")
    rows = []
    for seed in seeds:
        row = run_seed(args, seed)
        rows.append(row)
        steps = row["checks"][-1]["step"] if row["checks"] else 0
        trace = "  ".join(f"{c['step']}: {100 * c['own_vs_other']:.0f}%" for c in row["checks"])
        print(f"seed {seed}: token check (own vs other) {trace}", flush=True)
        print(header + "\n|---|---|---|---|---|---|---|---|\n" + format_row(row, steps), flush=True)
    print("\nAll seeds:\n" + header + "\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row, row["checks"][-1]["step"] if row["checks"] else 0))


if __name__ == "__main__":
    main()
