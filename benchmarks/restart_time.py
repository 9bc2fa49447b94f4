"""Restart-to-first-step time of the trainer with JAX's persistent compilation cache off and warm.

A preemptible slice restarts often; every restart used to compile the train step from scratch. This script
trains a config for `--steps` steps (the run whose checkpoint a restart resumes, with the cache on: it also
fills the cache), then restarts it for ONE more step, in a fresh interpreter each time, twice per mode:

  off   config.train.compilation_cache=''   (what every restart paid before)
  warm  config.train.compilation_cache=<the filled cache>

and prints, per restart: wall seconds from interpreter start to the first step's loss read back (imports,
build, checkpoint restore, compile or cache load, one step), the seconds of JAX's backend_compile_duration
events inside that ("backend compile": compiles, or loads from the cache) and their number. Usage (from
the repository root):

  python benchmarks/restart_time.py --config=configs/tiny.py:deltatok [--repeats=2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One restart: resume `workdir` and train `num_steps` (= the saved step + 1). Times from interpreter start.
CHILD = r"""
import time
start = time.time()
import json, sys
import jax
from jax import monitoring
import importlib.util
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiles.append(seconds) if event == "/jax/core/compile/backend_compile_duration" else None)
from deltaworld_jax.training import trainer
config_file, workdir, num_steps, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
path, _, arg = config_file.partition(":")
spec = importlib.util.spec_from_file_location("restart_config", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(arg) if arg else module.get_config()
config.train.num_steps = num_steps
config.train.compilation_cache = cache
config.checkpoint.every_steps = 10**9  # the final step is saved anyway
out = trainer.run(config, workdir)
done = time.time()
print("RESULT" + json.dumps({"seconds": done - start, "compile_seconds": sum(compiles), "compiles": len(compiles),
                             "step": out["step"], "loss": out["losses"].get(num_steps)}))
"""


def _run(config: str, workdir: str, num_steps: int, cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(key, None)  # the config value alone decides
    proc = subprocess.run([sys.executable, "-c", CHILD, config, workdir, str(num_steps), cache], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"restart failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py:deltatok")
    parser.add_argument("--steps", type=int, default=2, help="steps of the run that is then restarted")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="restart_time_")
    try:
        cache = os.path.join(scratch, "jax_cache")
        base = os.path.join(scratch, "base")
        first = _run(args.config, base, args.steps, cache)  # the run that is restarted; fills the cache
        print(f"{args.config}: first run to step {args.steps}: {first['seconds']:.1f} s "
              f"({first['compiles']} compiles, {first['compile_seconds']:.1f} s); cache {cache}")
        rows = []
        for repeat in range(args.repeats):
            for mode, cache_dir in (("off", ""), ("warm", cache)):
                workdir = os.path.join(scratch, f"{mode}_{repeat}")
                shutil.copytree(os.path.join(base, "checkpoints"), os.path.join(workdir, "checkpoints"))
                result = _run(args.config, workdir, args.steps + 1, cache_dir)
                rows.append((mode, result))
                print(f"restart {repeat + 1} cache {mode:4s}: {result['seconds']:6.1f} s to the first step "
                      f"(backend compile {result['compile_seconds']:5.1f} s in {result['compiles']} compiles; "
                      f"loss at step {result['step']}: {result['loss']:.6f})", flush=True)
        losses = {r["loss"] for _, r in rows}
        mean = {m: sum(r["seconds"] for k, r in rows if k == m) / args.repeats for m in ("off", "warm")}
        print(f"mean restart-to-first-step: cache off {mean['off']:.1f} s, warm {mean['warm']:.1f} s "
              f"({mean['off'] / mean['warm']:.1f}x); first-step loss identical in all restarts: {len(losses) == 1}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
