"""The device mesh of training (axes ``("data", "fsdp", "tensor")``, with an ``"expert"`` axis
before ``"tensor"`` when expert parallelism is asked for) and joining the multi-process runtime."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "expert", "tensor")  # outermost to innermost


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int, expert: int = 1
               ) -> tuple[int, ...]:
    """Resolve one ``-1`` entry to the devices left over; the product must be ``device_count``.
    Returns the sizes of :func:`mesh_axes`: ``(data, fsdp, tensor)``, or ``(data, fsdp, expert,
    tensor)`` when the expert axis has more than one device."""
    named = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    sizes = [named[a] for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {named}")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if device_count % known:
            raise ValueError(f"mesh: {named} does not divide {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ValueError(f"mesh: {named} needs {int(np.prod(sizes))} devices, "
                         f"{device_count} are available")
    return tuple(s for a, s in zip(AXES, sizes, strict=True) if a != "expert" or s > 1)


def mesh_axes(shape: Sequence[int]) -> tuple[str, ...]:
    """Axis names of a :func:`mesh_shape` result."""
    return AXES if len(shape) == len(AXES) else tuple(a for a in AXES if a != "expert")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (all devices of all processes by default); the ``expert`` axis
    exists when ``expert`` resolves to more than one device."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices), expert)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), mesh_axes(shape))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> None:
    """Join JAX's multi-controller runtime (``jax.distributed.initialize``).

    Each setting comes from the argument, else from ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` / ``JAX_LOCAL_DEVICE_IDS`` (comma-separated), else
    from JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU VMs, Kubernetes). When address,
    count and id are all given, auto-detection is off, so every visible device is used unless
    ``local_device_ids`` restricts them (SLURM auto-detection would keep one GPU per task)."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    explicit = None not in (address, count, index)
    jax.distributed.initialize(
        coordinator_address=address, num_processes=count, process_id=index,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        cluster_detection_method="deactivate" if explicit else None)
