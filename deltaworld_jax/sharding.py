"""Device mesh, logical-to-mesh axis rules, and sharded placement of parameters and batches.

Parameters carry LOGICAL axis names (`embed`, `mlp`, `heads`, `vocab`, `norm`; see models/basic_layers.py). The
mapping from logical names to the mesh axes (`data`, `fsdp`, `tensor`) is config data, so data parallelism,
FSDP and FSDP + tensor parallelism differ only in `config.mesh`:

  DP:        mesh.shape = {data: -1, fsdp: 1, tensor: 1}   every parameter replicated
  FSDP:      mesh.shape = {data: 1, fsdp: -1, tensor: 1}   `embed` dims split over all devices
  FSDP + TP: mesh.shape = {data: 1, fsdp: -1, tensor: 2}   `mlp`/`heads` dims split over `tensor` too

The batch is split over (data, fsdp): every device sees different examples in all three layouts.

On multi-slice TPU systems (devices spanning several slices) the `data` axis is laid across slices (the
slow DCN links carry only the gradient all-reduce) and the rest within a slice, via
`mesh_utils.create_hybrid_device_mesh`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# ----------------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """{data, fsdp, tensor} sizes with at most one -1 (filled so the product is the device count)."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh.shape {dict(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh.shape {dict(shape)}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh.shape {dict(shape)}: {num_devices} devices are not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh.shape {dict(shape)} -> {tuple(sizes)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices the devices span (1 for GPUs, CPUs and single-slice TPUs)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_array(sizes: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
    """The devices laid out as the (data, fsdp, tensor) mesh when they span several TPU slices: `data` is
    split across slices (only the gradient all-reduce crosses the slow DCN links), the rest stays inside
    a slice. None on a single slice (jax.make_mesh picks the layout)."""
    slices = num_slices(devices)
    if slices == 1:
        return None
    if sizes[0] % slices:
        raise ValueError(f"Devices span {slices} slices: the data axis ({sizes[0]}) must be a multiple of it "
                         f"(mesh.shape data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})")
    ici_shape = (sizes[0] // slices, sizes[1], sizes[2])
    return mesh_utils.create_hybrid_device_mesh(ici_shape, (slices, 1, 1), devices)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh described by `mesh_config.shape` over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(dict(mesh_config.shape), len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    hybrid = device_array(sizes, devices)
    if hybrid is not None:
        return Mesh(hybrid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def axis_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
    """The logical axis rules of `config.mesh`: its `rules`, (logical name, mesh axis / axes / None) pairs,
    config data (configs/common.py MESH_RULES is every config's default)."""
    rules = mesh_config.get("rules", None) if hasattr(mesh_config, "get") else None
    if not rules:
        raise ValueError("config.mesh.rules is empty: give the logical-to-mesh axis rules, e.g. "
                         "configs/common.py MESH_RULES (every config built on configs.common.base_config has them)")
    normalised = []
    for name, axes in rules:
        flat = axes if isinstance(axes, (tuple, list)) else (axes,)
        for axis in flat:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"Rule {name!r} -> {axes!r}: unknown mesh axis {axis!r}; allowed {MESH_AXES}")
        normalised.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(normalised)


# ----------------------------------------------------------------------------------------------------
# Logical names -> partition specs
# ----------------------------------------------------------------------------------------------------


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], rules, mesh: Mesh,
                    where: str = "") -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dims carry logical `names`.

    A dim whose size the mapped mesh axes do not divide stays replicated (e.g. a 12-head gate on a
    tensor axis of 8), and a mesh axis already used by an earlier dim is not reused."""
    if not names:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"{where}: logical axes {tuple(names)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{where}: logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % ways:
            if axes:
                logging.log_first_n(logging.INFO, "%s: dim %s (%d) not divisible by %s=%d; replicated", 8,
                                    where, name, size, axes, ways)
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _variable_axes(variable: nnx.Variable) -> tuple | None:
    metadata = variable.get_metadata()
    return metadata.get("out_sharding") or metadata.get("sharding_names") or None


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for every Variable of an (abstract or concrete) nnx.State, from its logical axes."""

    def one(path, variable):
        where = "/".join(str(p) for p in path)
        spec = logical_to_spec(_variable_axes(variable), variable.shape, rules, mesh, where)
        return variable.replace(NamedSharding(mesh, spec))

    return nnx.map_state(one, state)


def pure_shardings(state: nnx.State, mesh: Mesh, rules) -> dict:
    """As `state_shardings`, as a pure nested dict of NamedShardings (the layout of the train state)."""
    return nnx.to_pure_dict(state_shardings(state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def current_platform(mesh: Mesh | None = None) -> str:
    """"tpu", "gpu" or "cpu": of the devices of `mesh`, else of the mesh in context (`jax.set_mesh`), else of
    the default backend. An ahead-of-time compile for TPU devices from a CPU host lowers for TPU."""
    if mesh is not None:
        device = mesh.devices.flat[0]
    else:
        context = jax.sharding.get_abstract_mesh()
        device = None if context.empty else getattr(context, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def batch_ways(mesh) -> int:
    """How many ways `mesh` (a Mesh or AbstractMesh) splits the batch: the product of its BATCH_AXES' sizes."""
    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) dim split over the batch axes (BATCH_AXES) of the mesh in context
    (`jax.set_mesh`), its other dims left to the partitioner; `x` unchanged without such a mesh, when those
    axes are all of size 1, or when they do not divide the dim.

    Why: nothing else tells XLA's partitioner how to lay out activations. With FSDP (`embed` dims of the
    weights split over `fsdp`) it kept the weights where they are and split the activations' hidden dim
    instead, all-gathering the batch: every device ran the blocks on the whole global micro-batch with
    1/fsdp of the width and all-reduced full-batch activations after every matmul (DeltaTok 256px on
    v5e:2x2: [64, 261, 768] bf16 all-reduces in DINOv3's blocks), and the odd-sized full-batch tensors made
    the TPU backend's largest, slowest-to-compile kernels (benchmarks/RESULTS.md "Where the TPU compile
    time goes"). Split by batch, each device runs its own examples with all-gathered weights (FSDP proper)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim == 0:
        return x
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if not axes or x.shape[0] % batch_ways(mesh):
        return x
    batch = axes[0] if len(axes) == 1 else axes
    return jax.lax.with_sharding_constraint(x, PartitionSpec(batch, *[PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
