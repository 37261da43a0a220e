"""The device mesh (axes 'data' and 'fsdp') and the shardings of batches and parameters.

The batch is split over every device (both axes); parameters are split over 'fsdp' by the regex
rules of `apd.models.partitioning`, replicated over 'data'. With fsdp = 1 this is plain data
parallelism.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH = PartitionSpec(AXES)


def make(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh; one of the two sizes may be -1 to fill the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh sizes must be positive, with at most one -1 (fill); got data={data}, "
            f"fsdp={fsdp}."
        )
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh with an axis of {known}.")
        sizes[sizes.index(-1)] = n // known
    if sizes[0] * sizes[1] != n:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} needs {sizes[0] * sizes[1]} devices; "
            f"there are {n}."
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh, process_count: int = 1) -> None:
    """The batch is split over every device and every process: it must divide evenly."""
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number of "
            f"devices in the mesh ({devices} = data {mesh.shape['data']} x fsdp "
            f"{mesh.shape['fsdp']}) and of the process count ({process_count})."
        )
