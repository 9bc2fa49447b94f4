"""Benchmarks: parameters and FLOPs, step time and MFU, ahead-of-time compiles for TPU slices, token cache.

  python -m benchmarks.benchmark flops --config=configs/kinetics.py:stage=deltaworld
      parameters per component (abstract modules), analytic FLOPs per training step and per forecast,
      and the FLOPs XLA counts in the compiled real train step (--xla_batch clips), side by side.
  python -m benchmarks.benchmark step --config=configs/kinetics.py:stage=deltatok_256 \
        --config.train.batch_size=8
      compile + median step time of the trainer's real step on the local devices, examples/s, MFU, memory.
  JAX_PLATFORMS=cpu python -m benchmarks.benchmark aot --config=configs/kinetics.py:stage=deltatok_512 \
        --topology=v5p:4x4x4 [--num_slices=2] [--sharding=fsdp] [--per_chip_batch=16] [--remat=full]
      compiles the real step for a TPU slice on this host (needs libtpu): per-chip memory vs HBM, FLOPs,
      per-chip batch and accumulation reaching the effective batch 1024, roofline step time.
  JAX_PLATFORMS=cpu python -m benchmarks.benchmark fit --config=...:stage=deltaworld --chip=v5e
      the smallest slice (and its sharding, remat, per-chip batch) where the stage fits in <= 90% HBM;
      with --inputs='results/aot_<stage>_*.json' --chip=v5p: predicted from earlier `aot` compiles.
  python -m benchmarks.benchmark tokens --config=...:stage=deltaworld --output=/path/tokens
      writes DeltaTok delta tokens of a dataset's clips, for DeltaWorld training from tokens alone.

  python -m benchmarks.benchmark table --inputs='benchmarks/results/aot_*.json'
      the `aot` results as a Markdown table (benchmarks/RESULTS.md).

Every subcommand can write its numbers as JSON (--json_out) for benchmarks/RESULTS.md and the launch scripts.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg] to benchmark.", lock_config=False)
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the results as JSON here.")
_XLA = flags.DEFINE_bool("xla", True, "flops: also compile the real step and read XLA's cost analysis.")
_XLA_BATCH = flags.DEFINE_integer("xla_batch", 2, "flops: clips in the compiled step for the XLA count.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "step: untimed steps after compilation.")
_STEPS = flags.DEFINE_integer("steps", 20, "step: timed steps (the median is reported).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "aot: TPU topology, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "aot: number of slices (multi-slice over DCN).")
_SHARDING = flags.DEFINE_string("sharding", "fsdp", "aot: dp | fsdp | fsdp_tp2 | fsdp_tp4, or 'config' "
                                "(config.mesh.shape as is).")
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", 0, "aot: micro-batch per chip (0: "
                                       "config.train.batch_size / chips, no accumulation).")
_REMAT = flags.DEFINE_string("remat", "", "aot/step: remat policy override (none, full, dots_saveable, ...).")
_CHIP = flags.DEFINE_string("chip", "v5e", "fit: chip family (v5e, v5p, v6e, v4).")
_OUTPUT = flags.DEFINE_string("output", "", "tokens: output folder of the token cache.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 0, "tokens: clips to tokenise (0: the whole source).")
_STAGE = flags.DEFINE_string("stage", "", "For recipe configs (config.stage_configs, e.g. configs/demo.py): the "
                             "stage to benchmark.")

_INPUTS = flags.DEFINE_string("inputs", "benchmarks/results/aot_*.json", "table: glob of `aot` JSON results.")

COMMANDS = ("flops", "step", "aot", "fit", "tokens", "table")


def _write_json(payload) -> None:
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(payload, f, indent=1, default=str)


def _config():
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    if "stage_configs" in config:
        stages = sorted(config.stage_configs)
        if _STAGE.value not in stages:
            raise app.UsageError(f"--config is a recipe of stages {stages}: name one with --stage")
        config = config.stage_configs[_STAGE.value]
    if _REMAT.value:
        config.model.remat = _REMAT.value
    return config


def cmd_flops() -> None:
    from benchmarks import analysis

    report = analysis.flops_report(_config(), xla=_XLA.value, xla_batch=_XLA_BATCH.value)
    print(analysis.format_report(report))
    report["forecast"] = {f"{k[0]}_{'official_eval' if k[1] else 'forecast_only'}": v
                          for k, v in report.get("forecast", {}).items()}
    _write_json(report)


def cmd_step() -> None:
    from benchmarks import step

    result = step.time_step(_config(), warmup=_WARMUP.value, steps=_STEPS.value)
    print(step.format_step(result))
    _write_json(result)


def cmd_aot() -> None:
    from deltaworld_jax import aot

    if not aot.libtpu_available():
        raise app.UsageError("aot needs libtpu (pip install libtpu); run it with JAX_PLATFORMS=cpu")
    config = _config()
    sharding = dict(config.mesh.shape) if _SHARDING.value == "config" else _SHARDING.value
    result = aot.compile_on_topology(config, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, sharding=sharding,
                                     per_chip_batch=_PER_CHIP_BATCH.value or None, remat=_REMAT.value or None)
    print(aot.format_result(result))
    _write_json(result)


def cmd_fit() -> None:
    from benchmarks import fit
    from deltaworld_jax import aot

    if flags.FLAGS["inputs"].present:  # predictions from earlier `aot` results, no compile
        import glob

        compiled = []
        for path in sorted(glob.glob(_INPUTS.value)):
            with open(path) as f:
                compiled.append(json.load(f))
        if not compiled:
            raise app.UsageError(f"no files match --inputs={_INPUTS.value}")
        result = fit.predict_from_compiles(compiled, _CHIP.value)
        print(fit.format_prediction(result))
        _write_json(result)
        return
    if not aot.libtpu_available():
        raise app.UsageError("fit needs libtpu (pip install libtpu); run it with JAX_PLATFORMS=cpu")
    result = fit.smallest_fit(_config(), _CHIP.value, log=lambda line: print(line, flush=True))
    print(fit.format_fit(result))
    _write_json(result)


def cmd_tokens() -> None:
    from deltaworld_jax.data import token_cache as tokens

    if not _OUTPUT.value:
        raise app.UsageError("tokens needs --output")
    from deltaworld_jax import tasks

    frozen = tasks.make_task(_config()).build_frozen()
    summary = tokens.write_token_cache(_config(), _OUTPUT.value, frozen["vfm"], frozen["tokenizer"],
                                       num_clips=_NUM_CLIPS.value or None)
    print(tokens.format_summary(summary))
    _write_json(summary)


def cmd_table() -> None:
    import glob

    from benchmarks import tables

    paths = sorted(glob.glob(_INPUTS.value))
    if not paths:
        raise app.UsageError(f"no files match --inputs={_INPUTS.value}")
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    print(tables.aot_markdown_table(results))


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m benchmarks.benchmark {{{'|'.join(COMMANDS)}}} --config=...")
    {"flops": cmd_flops, "step": cmd_step, "aot": cmd_aot, "fit": cmd_fit, "tokens": cmd_tokens,
     "table": cmd_table}[argv[1]]()
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
