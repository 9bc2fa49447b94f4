"""Per-process host batches -> global jax.Arrays sharded over the mesh's data axes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] = "data") -> NamedSharding:
    """Leading (batch) axis split over `data_axes` (e.g. ("data", "fsdp")), the rest replicated."""
    axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"data axes {missing} are not axes of the mesh {mesh.axis_names}")
    return NamedSharding(mesh, PartitionSpec(axes))


def place_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, data_axes: str | Sequence[str] = "data") -> dict:
    """Each process passes ITS batch (leading axis = per-process batch); returns global arrays whose
    leading axis is process_count times longer, sharded over `data_axes`."""
    sharding = batch_sharding(mesh, data_axes)
    axes = sharding.spec[0]
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_size = value.shape[0] * jax.process_count()
        if value.ndim == 0 or global_size % shards:
            raise ValueError(f"batch[{key!r}] of shape {value.shape}: the global batch "
                             f"{global_size} must split evenly over {shards} shards of axes {axes}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
