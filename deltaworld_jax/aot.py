"""Ahead-of-time compilation of the real train step for a TPU pod slice, from any host.

`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x4")` gives
compile-only devices of that slice (it needs libtpu, not a TPU). The trainer's own step is lowered over a
mesh of them exactly as a real run builds it (trainer.build with abstract frozen modules: same task, sharding
rules, optimiser, jit shardings, donation), compiled, and XLA reports per-device memory and FLOPs. Nothing here is TPU-specific
code: the same functions compile for local CPU/GPU devices.

Run with JAX_PLATFORMS=cpu (so no TPU runtime is looked for) in an environment where libtpu is installed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax

import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from deltaworld_jax import flops as flops_lib, sharding as sharding_lib, tasks
from deltaworld_jax.data import placement
from deltaworld_jax.models import block_stack
from deltaworld_jax.pretrained.runs import abstract_like
from deltaworld_jax.training import train_step as step_lib, trainer

# The effective batch of every stage of the published recipe (the official README's training recipe).
EFFECTIVE_BATCH = 1024

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    hbm_gib: float  # per chip
    peak_bf16_tflops: float  # per chip, dense
    accelerator_prefix: str  # Cloud TPU accelerator-type name
    cores_in_accelerator_name: int  # v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips
    chips_per_host: int


CHIPS = {
    "v4": ChipSpec("TPU v4", 32, 275, "v4", 2, 4),
    "v5e": ChipSpec("TPU v5e", 16, 197, "v5litepod", 1, 4),
    "v5p": ChipSpec("TPU v5p", 95, 459, "v5p", 2, 4),
    "v6e": ChipSpec("TPU v6e", 32, 918, "v6e", 1, 4),
}

# Slice shapes tried by the search, smallest first (all valid Cloud TPU topologies).
SLICES = {
    "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
}

# Named shardings: the mesh shape each one means (sharding.py's axes), for `--sharding`.
SHARDINGS = {
    "dp": dict(data=-1, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=-1, tensor=1),
    "fsdp_tp2": dict(data=1, fsdp=-1, tensor=2),
    "fsdp_tp4": dict(data=1, fsdp=-1, tensor=4),
}


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod):(\d+(?:x\d+)*)", name)
    if not match:
        raise ValueError(f"topology {name!r}: expected <chip>:<dims>, e.g. v5e:2x2, v5p:4x4x4 (chips: {sorted(CHIPS)})")
    family = "v5e" if match.group(1) == "v5litepod" else match.group(1)
    return family, tuple(int(d) for d in match.group(2).split("x"))


def topology_devices(name: str, num_slices: int = 1):
    """Compile-only devices of `num_slices` slices of topology `name` (needs libtpu)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise RuntimeError("jax.experimental.topologies is unavailable") from e
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def accelerator_type(family: str, chips_per_slice: int) -> str:
    spec = CHIPS[family]
    return f"{spec.accelerator_prefix}-{chips_per_slice * spec.cores_in_accelerator_name}"


def memory_report(compiled, hbm_bytes_per_device: float) -> dict[str, float]:
    m = compiled.memory_analysis()
    args, temp = float(m.argument_size_in_bytes), float(m.temp_size_in_bytes)
    code, out, alias = float(m.generated_code_size_in_bytes), float(m.output_size_in_bytes), float(m.alias_size_in_bytes)
    total = args + temp + code + out - alias  # donated outputs live in their arguments' buffers
    return {"arguments": args, "temporaries": temp, "generated_code": code, "outputs": out, "aliased": alias,
            "total": total, "hbm": hbm_bytes_per_device, "hbm_fraction": total / hbm_bytes_per_device}


def state_specs(setup: trainer.Setup) -> dict[str, list]:
    """{parameter path: partition spec as a list (per dim: None, a mesh axis, or a list of axes)} of the
    train state's parameters, as laid out on the mesh (JSON friendly)."""
    flat = jax.tree_util.tree_flatten_with_path(setup.state_shardings.params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path):
            [list(d) if isinstance(d, tuple) else d for d in sharding.spec] for path, sharding in flat}


def compile_on_topology(config, topology: str, *, num_slices: int = 1, sharding: str | dict = "fsdp",
                        per_chip_batch: int | None = None, remat: str | None = None,
                        effective_batch: int = EFFECTIVE_BATCH, count_flops: bool = True) -> dict[str, Any]:
    """Compile the train step of `config` for `num_slices` x `topology`; per-device memory, FLOPs, roofline.

    per_chip_batch: examples per chip per micro-batch (None: config.train.batch_size / chips, no
    accumulation); accumulation = effective_batch / (chips * per_chip_batch)."""
    family, dims = parse_topology(topology)
    spec = CHIPS[family]
    devices = topology_devices(topology, num_slices)
    chips = math.prod(dims) * num_slices
    num_devices = len(devices)
    mesh_shape = SHARDINGS[sharding] if isinstance(sharding, str) else dict(sharding)
    if per_chip_batch is None:
        global_batch = int(config.train.batch_size)
        if global_batch % chips:
            raise ValueError(f"global batch {global_batch} is not divisible by {chips} chips")
        per_chip_batch, accumulation = global_batch // chips, 1
        effective_batch = global_batch
    else:
        if effective_batch % (chips * per_chip_batch):
            raise ValueError(f"effective batch {effective_batch} is not divisible by {chips} chips x "
                             f"{per_chip_batch} per chip")
        accumulation = effective_batch // (chips * per_chip_batch)
    cfg = benchmark_config(config, batch_size=effective_batch, accumulation_steps=accumulation,
                                   mesh_shape=mesh_shape, remat=remat)
    mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
    t0 = time.perf_counter()
    lowered, step_fn, args, setup = lower_train_step(cfg, mesh)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    hbm_per_device = spec.hbm_gib * GIB * chips / num_devices
    xla, loops = flops_lib.xla_flops(compiled)
    result: dict[str, Any] = {
        "config_kind": cfg.model.kind,
        "topology": topology, "num_slices": num_slices, "chips": chips, "devices": num_devices,
        "accelerator_type": accelerator_type(family, math.prod(dims)), "chip": spec.name,
        "mesh": dict(mesh.shape), "sharding": sharding if isinstance(sharding, str) else "custom",
        "remat": cfg.model.get("remat") or block_stack.DEFAULT_REMAT,  # unset: the model configs' default
        "scan_layers": bool(cfg.model.get("scan_layers", False)),  # blocks stored stacked (block_stack.BlockStack)
        "per_chip_batch": per_chip_batch, "accumulation_steps": accumulation, "effective_batch": effective_batch,
        "lower_seconds": lower_s, "compile_seconds": compile_s,
        "memory": memory_report(compiled, hbm_per_device),
        "xla_flops_per_device": xla, "xla_while_loops": loops,
        "state_specs": state_specs(setup),
    }
    # The compiled program must keep the train state exactly where the rules put it.
    state_in = compiled.input_shardings[0][0]
    result["state_shardings_kept"] = bool(all(
        a.is_equivalent_to(b, len(a_shape))
        for a, b, a_shape in zip(jax.tree.leaves(state_in), jax.tree.leaves(setup.state_shardings),
                                 [x.shape for x in jax.tree.leaves(setup.abstract_state)])))
    if count_flops:
        with jax.set_mesh(mesh):
            counted, stats = flops_lib.jaxpr_matmul_flops(step_fn, *args)
        peak = spec.peak_bf16_tflops * 1e12
        roofline = counted / chips / peak
        result.update({
            "matmul_flops_per_step": counted, "jaxpr_while_loops": stats.get("while_loops", 0),
            "roofline_step_seconds": roofline,
            "roofline_samples_per_second_per_chip": effective_batch / chips / roofline if roofline else float("nan"),
        })
    return result


# Official GPU throughput implied by amazon-far/deltatok's README ('Example Training Resources', H200):
# steps x 1024 / (hours x 3600 x GPUs): 1M x 1024 / (82 h x 8) = 434; 500k x 1024 / (89 h x 16) = 100;
# 300k x 1024 / (32 h x 32) = 83 samples (clips) per second per GPU.
OFFICIAL_GPU_SAMPLES_PER_SECOND = {
    "deltatok_256": 434.0,
    "deltatok_512": 100.0,
    "deltaworld": 83.0,
}


def format_result(r: dict[str, Any]) -> str:
    m = r["memory"]
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    lines = [
        f"{r['config_kind']} on {r['num_slices']} x {r['topology']} ({r['accelerator_type']}, {r['chips']} chips, "
        f"{r['devices']} devices), mesh {r['mesh']}, remat {r['remat']}"
        + (", blocks stored stacked" if r.get("scan_layers") else ""),
        f"  per-chip micro-batch {r['per_chip_batch']} x {r['chips']} chips x accumulation "
        f"{r['accumulation_steps']} = effective batch {r['effective_batch']}",
        f"  lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s",
        f"  memory per device: arguments {g(m['arguments'])}, temporaries {g(m['temporaries'])}, "
        f"generated code {g(m['generated_code'])}, outputs {g(m['outputs'])} (aliased {g(m['aliased'])})",
        f"  total {g(m['total'])} of {g(m['hbm'])} HBM = {100 * m['hbm_fraction']:.1f}%"
        + ("  FITS (<= 90%)" if m["hbm_fraction"] <= 0.9 else "  DOES NOT FIT with 10% headroom"),
        f"  XLA cost analysis: {flops_lib.format_flops(r['xla_flops_per_device'])} per device"
        + (f" (while loops: {r['xla_while_loops']}; bodies counted once)" if r["xla_while_loops"] else ""),
    ]
    if "matmul_flops_per_step" in r:
        lines += [
            f"  matmul FLOPs per optimiser step (traced, loops counted): {flops_lib.format_flops(r['matmul_flops_per_step'])}",
            f"  roofline step time {r['roofline_step_seconds'] * 1e3:.1f} ms -> "
            f"{r['roofline_samples_per_second_per_chip']:.1f} samples/s per chip at 100% of peak",
        ]
    lines.append(f"  train state kept its rule shardings in the compiled program: {r['state_shardings_kept']}")
    specs = list(r["state_specs"].items())
    for path, spec in specs[:6]:
        lines.append(f"    {path}: {spec}")
    if len(specs) > 6:
        lines.append(f"    ... {len(specs) - 6} more parameters")
    return "\n".join(lines)


def fits(result: dict[str, Any], headroom: float = 0.9) -> bool:
    return result["memory"]["hbm_fraction"] <= headroom


# ----------------------------------------------------------------------------------------------------
# The trainer's real train step as a program to compile, with abstract shapes: no weights, no data.
# `trainer.build(config, mesh, abstract_frozen=True)` builds the frozen modules with nnx.eval_shape
# instead of loading and placing them, so the whole step can be lowered for devices that do not exist
# here; `lower_train_step` lowers `train_step.make_train_step` + `train_step.jit_train_step`, the
# functions the trainer jits, with ShapeDtypeStructs carrying the real shardings.
# ----------------------------------------------------------------------------------------------------


def benchmark_config(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
                     accumulation_steps: int | None = None, mesh_shape: dict | None = None,
                     remat: str | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` for benchmarking: frozen modules randomly initialised (no weight files are
    read; FLOPs, time and memory do not depend on the values), optional overrides of the global batch,
    the accumulation, the mesh shape and the remat policy."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    if "vfm" in cfg and "weights" in cfg.vfm:
        cfg.vfm.weights = ""
    if "tokenizer" in cfg and cfg.tokenizer is not None:
        cfg.tokenizer.checkpoint = ""
        cfg.tokenizer.allow_random = True  # tasks/deltaworld.py: a randomly initialised DeltaTok of the same sizes
    if batch_size is not None:
        cfg.train.batch_size = int(batch_size)
    if accumulation_steps is not None:
        cfg.optim.accumulation_steps = int(accumulation_steps)
    if mesh_shape is not None:
        cfg.mesh.shape = dict(mesh_shape)
    if remat is not None:
        cfg.model.remat = remat
    return cfg


def batch_shapes(config, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `config` (the data pipeline's batch contract)."""
    b = int(config.train.batch_size if global_batch is None else global_batch)
    t = int(config.data.num_frames)
    h, w = frame_hw(config)
    shapes = {"frames": jax.ShapeDtypeStruct((b, t, h, w, 3), jnp.uint8),
              "timestamps": jax.ShapeDtypeStruct((b, t), jnp.float32)}
    if trains_from_tokens(config):
        width = int(config.tokenizer.get("hidden_size", 0) or config.model.get("backbone_hidden_size", 0) or 768)
        shapes = {"tokens": jax.ShapeDtypeStruct((b, t, width), jnp.float32), "timestamps": shapes["timestamps"]}
    return shapes


def trains_from_tokens(config) -> bool:
    """DeltaWorld from precomputed delta tokens (config.data.token_cache set): batches of tokens, no frames."""
    return (getattr(tasks.task_class(config), "trains_from_tokens", False)
            and bool(config.data.get("token_cache", "")))


def frame_hw(config) -> tuple[int, int]:
    size = config.data.frame_size
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _with_sharding(shapes: dict, mesh: Mesh) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placement.batch_sharding(mesh, sharding_lib.BATCH_AXES))
            for k, v in shapes.items()}


def build_jitted_step(setup: trainer.Setup, config, batch_sharding_tree):
    """The trainer's step function, jitted exactly as the trainer jits it."""
    step_fn = step_lib.make_train_step(setup.task, setup.graphdef, setup.frozen_graphdef, setup.tx,
                                       accumulation_steps=int(config.optim.get("accumulation_steps", 1)),
                                       mesh=setup.mesh, lr_schedule=setup.schedule)
    jitted = step_lib.jit_train_step(step_fn, setup.state_shardings, setup.frozen_shardings,
                                     batch_sharding_tree, setup.mesh)
    return step_fn, jitted


def abstract_step_args(setup: trainer.Setup, config) -> tuple:
    """(state, frozen, batch, key) as ShapeDtypeStructs carrying the trainer's shardings."""
    batch = _with_sharding(batch_shapes(config), setup.mesh)
    state = abstract_like(setup.abstract_state, setup.state_shardings)
    frozen = abstract_like(setup.frozen_state, setup.frozen_shardings)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(setup.mesh))
    return state, frozen, batch, key


def lower_train_step(config, mesh: Mesh):
    """(lowered program, step_fn, abstract args, setup) of the trainer's real step for `config` on `mesh`."""
    setup = trainer.build(config, mesh, abstract_frozen=True)
    args = abstract_step_args(setup, config)
    step_fn, jitted = build_jitted_step(setup, config, jax.tree.map(lambda x: x.sharding, args[2]))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
    return lowered, step_fn, args, setup
