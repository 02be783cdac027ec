"""Logical-axis sharding: every parameter path and activation gets logical axis names, and one
table maps logical axes to mesh axes. A dimension whose size the mesh axes do not divide is
replicated instead (small projections such as ``in_proj_a``), and mesh axes the mesh does not have
are ignored (the optional ``expert`` axis: a mesh ``("data", "fsdp", "expert", "tensor")`` shards
the stacked MoE experts over ``expert`` and the batch over it as well)."""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flare_jax.checkpoint import Nested

# Logical axis -> mesh axes. FSDP shards the model dimension of every weight; tensor parallelism
# shards heads, MLP width and vocabulary; expert parallelism shards the experts; the batch is split
# over data, fsdp and expert.
LOGICAL_TO_MESH: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "embed": ("fsdp",),
    "act_embed": (),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "router": (),  # the expert dimension of the router and the shared expert's gate
    "conv": (),
    "norm": (),
}

# Parameter path (``/``-joined, layer index as digits) -> logical axes, first match wins.
PARAM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"self_attn/[qkv]_proj/kernel", ("embed", "heads")),
    (r"self_attn/o_proj/kernel", ("heads", "embed")),
    (r"linear_attn/in_proj_(qkv|z|a|b)/kernel", ("embed", "heads")),
    (r"linear_attn/out_proj/kernel", ("heads", "embed")),
    (r"linear_attn/conv_weight", ("conv", "heads")),
    (r"linear_attn/(A_log|dt_bias)", ("heads",)),
    (r"mlp/(shared_expert/)?(gate|up)_proj/kernel", ("embed", "mlp")),
    (r"mlp/(shared_expert/)?down_proj/kernel", ("mlp", "embed")),
    (r"mlp/(gate|shared_expert_gate)/kernel", ("embed", "router")),
    (r"mlp/experts/(gate|up)_proj$", ("expert", "embed", "mlp")),
    (r"mlp/experts/down_proj$", ("expert", "mlp", "embed")),
    (r"(norm|layernorm)/weight$", ("norm",)),
)

# Activations by name -> logical axes.
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "length"),
    "hidden": ("batch", "length", "act_embed"),
    "logits": ("batch", "length", "vocab"),
}


def param_logical_axes(path: str, ndim: int) -> tuple[str, ...]:
    """Logical axes of the parameter at ``path``; raises if no rule covers it."""
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes to parameter "
                                 f"{path} of rank {ndim}")
            return axes
    raise ValueError(f"no sharding rule for parameter {path}; add one to PARAM_RULES")


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Partition spec of an array with ``axes``; undivisible dimensions are replicated."""
    spec: list[Any] = []
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in LOGICAL_TO_MESH[name] if mesh.shape.get(a, 1) > 1
                          and a not in used)
        width = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % width:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return PartitionSpec(*spec)


def param_shardings(params: Nested, mesh: Mesh) -> Nested:
    """A :class:`NamedSharding` per parameter of a nested (string-keyed) parameter dict."""
    def visit(tree: Nested, prefix: str) -> Nested:
        out = {}
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                out[key] = visit(value, path)
            else:
                axes = param_logical_axes(path, len(value.shape))
                out[key] = NamedSharding(mesh, logical_spec(axes, tuple(value.shape), mesh))
        return out

    return visit(params, "")


def activation_sharding(name: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Sharding of the activation ``name`` (see :data:`ACTIVATIONS`) of this shape."""
    return NamedSharding(mesh, logical_spec(ACTIVATIONS[name], shape, mesh))


def constrain(x: jax.Array, name: str, mesh: Mesh) -> jax.Array:
    """``with_sharding_constraint`` of an activation to its logical sharding."""
    return jax.lax.with_sharding_constraint(x, activation_sharding(name, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[B, L]`` batch arrays: rows over the batch mesh axes (the caller keeps ``B``
    divisible by their size, see :func:`batch_divisor`)."""
    axes = tuple(a for a in LOGICAL_TO_MESH["batch"] if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, None))


def batch_divisor(mesh: Mesh) -> int:
    """How many shards the batch dimension is split into."""
    return int(np.prod([mesh.shape.get(a, 1) for a in LOGICAL_TO_MESH["batch"]]))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def process_batch_slice(mesh: Mesh, process: int | None = None) -> tuple[int, int]:
    """``(index, count)``: the global batch is ``count`` equal slices of rows, one per group of
    processes whose devices hold the same rows, and ``process`` (this one by default) holds slice
    ``index``. Without axes spanning processes besides the batch ones, ``count`` is the process
    count; a tensor axis across two processes, for example, makes them share a slice."""
    process = jax.process_index() if process is None else process
    axes = [a for a in LOGICAL_TO_MESH["batch"] if a in mesh.shape]
    names = list(mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    grid = np.moveaxis(np.asarray(mesh.devices), [names.index(a) for a in axes],
                       list(range(len(axes)))).reshape(shards, -1)
    held = [s for s in range(shards) if any(d.process_index == process for d in grid[s])]
    width = len(held)
    if not held or held != list(range(held[0], held[0] + width)) or held[0] % width \
            or shards % width:
        raise ValueError(f"mesh {dict(mesh.shape)}: process {process} holds batch shards {held} "
                         f"of {shards}; expected an aligned contiguous range (order the mesh's "
                         "devices by process)")
    return held[0] // width, shards // width


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows ``[B_local, L]`` (its :func:`process_batch_slice`) into
    global ``[B, L]`` arrays sharded over the batch axes."""
    _, count = process_batch_slice(mesh)
    out = {}
    for key, value in local.items():
        global_shape = (value.shape[0] * count, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh), value,
                                                          global_shape)
    return out
