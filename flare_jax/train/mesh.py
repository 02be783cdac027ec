"""The device mesh of training: axes ``("data", "fsdp", "tensor")``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """Resolve one ``-1`` entry to the devices left over; the product must be ``device_count``."""
    sizes = [data, fsdp, tensor]
    named = dict(zip(AXES, sizes, strict=True))
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
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (all devices of all processes by default)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)
