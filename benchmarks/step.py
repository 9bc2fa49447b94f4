"""`benchmark step`: compile and time the trainer's real train step on the local devices.

Compile time, median step time over many steps after warm-up (each step waited for with
block_until_ready), examples/s, achieved FLOP/s and MFU against the device's peak, peak memory from the
compiled program's memory analysis. The model FLOPs for MFU are the analytic ones (what the official
model computes per step, no recompute), so remat shows up as lower MFU, as it should.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from deltaworld_jax import sharding as sharding_lib
from deltaworld_jax import aot as program, flops as flops_lib
from deltaworld_jax.data import placement
from deltaworld_jax.models import block_stack
from deltaworld_jax.training import mfu as training_mfu, trainer

from benchmarks import analysis

# The peak table lives with the trainer's MFU meter (training/mfu.py); re-exported for the benchmarks.
PEAK_BF16_TFLOPS, peak_flops = training_mfu.PEAK_BF16_TFLOPS, training_mfu.peak_flops


def random_batch(config, mesh, seed: int = 0) -> dict[str, jax.Array]:
    """A random global batch of the config's shapes, placed as the trainer places batches."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in program.batch_shapes(config).items():
        if key == "frames":
            value = rng.integers(0, 256, size=shape.shape, dtype=np.uint8)
        elif key == "timestamps":
            strides = rng.uniform(1 / 25, 1 / 3, size=(shape.shape[0], shape.shape[1] - 1))
            value = np.concatenate([np.zeros((shape.shape[0], 1)), np.cumsum(strides, 1)], 1).astype(np.float32)
        else:
            value = rng.standard_normal(shape.shape).astype(np.float32)
        out[key] = jax.device_put(value, placement.batch_sharding(mesh, sharding_lib.BATCH_AXES))
    return out


def materialize(setup: trainer.Setup, config):
    """A fresh train state (the trainer's own sharded init) and randomly initialised frozen modules."""
    state = trainer.init_state(config, setup)
    if setup.frozen_graphdef is None:
        return state, {}
    with jax.set_mesh(setup.mesh):
        frozen = jax.jit(lambda: nnx.to_pure_dict(nnx.split(setup.task.build_frozen())[1]),
                         out_shardings=setup.frozen_shardings)()
    return state, frozen


def compile_step(setup, cfg, state, frozen, batch, key) -> tuple[Any, float]:
    """The real train step for `cfg`, lowered and compiled for these (placed) arguments, and the seconds it took."""
    _, jitted = program.build_jitted_step(setup, cfg, jax.tree.map(lambda x: x.sharding, batch))
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        compiled = jitted.lower(state, frozen, batch, key).compile()
        return compiled, time.perf_counter() - t0


def time_step(config, *, warmup: int = 3, steps: int = 20, mesh=None) -> dict[str, Any]:
    """Compile and time the real train step for `config` (global batch config.train.batch_size)."""
    cfg = program.benchmark_config(config)
    mesh = sharding_lib.make_mesh(cfg.mesh) if mesh is None else mesh
    setup = trainer.build(cfg, mesh, abstract_frozen=True)
    state, frozen = materialize(setup, cfg)
    batch = random_batch(cfg, mesh)
    key = jax.random.PRNGKey(0)
    compiled, compile_s = compile_step(setup, cfg, state, frozen, batch, key)
    with jax.set_mesh(mesh):
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, batch, key)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    median = statistics.median(times)
    dims = analysis.model_dims(setup, cfg)
    model_flops = flops_lib.total(analysis.train_step_flops(
        dims, program.frame_hw(cfg), int(cfg.train.batch_size), int(cfg.data.num_frames),
        program.trains_from_tokens(cfg), official=False))
    device = mesh.devices.flat[0]
    peak = peak_flops(device)
    num_devices = mesh.devices.size
    mem = compiled.memory_analysis()
    achieved = model_flops / median
    return {
        "kind": cfg.model.kind, "device": f"{num_devices} x {device.device_kind}", "platform": device.platform,
        "batch_size": int(cfg.train.batch_size), "accumulation_steps": int(cfg.optim.get("accumulation_steps", 1)),
        "remat": cfg.model.get("remat") or block_stack.DEFAULT_REMAT, "frame_hw": program.frame_hw(cfg),
        "num_frames": int(cfg.data.num_frames), "dtype": cfg.model.get("dtype", "float32"),
        "compile_seconds": compile_s, "step_seconds_median": median,
        "step_seconds_min": min(times), "step_seconds_max": max(times), "timed_steps": steps,
        "examples_per_second": int(cfg.train.batch_size) / median, "model_flops_per_step": model_flops,
        "achieved_flops_per_second": achieved,
        "mfu": achieved / (peak * num_devices) if peak else None,
        "peak_flops_per_device": peak,
        "memory": {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                   "generated_code": mem.generated_code_size_in_bytes, "outputs": mem.output_size_in_bytes,
                   "aliased": mem.alias_size_in_bytes,
                   "peak_estimate": mem.argument_size_in_bytes + mem.temp_size_in_bytes
                   + mem.output_size_in_bytes - mem.alias_size_in_bytes},
        "final_loss": loss,
    }


def format_step(r: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    m = r["memory"]
    lines = [
        f"{r['kind']} train step on {r['device']}: batch {r['batch_size']} x {r['num_frames']} frames "
        f"{r['frame_hw'][0]}x{r['frame_hw'][1]}, accumulation {r['accumulation_steps']}, remat {r['remat']}, "
        f"compute dtype {r['dtype']}",
        f"  compile {r['compile_seconds']:.2f} s",
        f"  step {r['step_seconds_median'] * 1e3:.2f} ms median over {r['timed_steps']} "
        f"(min {r['step_seconds_min'] * 1e3:.2f}, max {r['step_seconds_max'] * 1e3:.2f}) -> "
        f"{r['examples_per_second']:.2f} examples/s",
        f"  model FLOPs/step {flops_lib.format_flops(r['model_flops_per_step'])} -> "
        f"{r['achieved_flops_per_second'] / 1e12:.4f} TFLOP/s"
        + (f", MFU {100 * r['mfu']:.1f}% of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device"
           if r["mfu"] is not None else " (no known peak for this device: FLOP/s only)"),
        f"  memory: arguments {mib(m['arguments'])}, temporaries {mib(m['temporaries'])}, outputs "
        f"{mib(m['outputs'])}, aliased {mib(m['aliased'])}, peak estimate {mib(m['peak_estimate'])}",
        f"  loss after the timed steps {r['final_loss']:.5f}",
    ]
    return "\n".join(lines)
