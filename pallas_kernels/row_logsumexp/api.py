"""Public row logsumexp: backend dispatch, padding of arrays smaller than one tile."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.row_logsumexp import gpu, reference


def row_logsumexp(x: jax.Array, *, backend: str = "auto", tiling: gpu.Tiling | None = None
                  ) -> jax.Array:
    """``log(sum(exp(x), axis=-1))`` of ``x [N, V]`` (any float dtype; finite or ``-inf``
    entries), fp32 ``[N]``. Not differentiable (its callers form their own gradients).

    backend: ``gpu`` runs the Pallas kernel (``gpu_interpret``: in interpret mode); every other
    backend (CPU, TPU) runs XLA's logsumexp (:mod:`.reference`).
    """
    if x.ndim != 2:
        raise ValueError(f"row_logsumexp expects x [N, V], got shape {x.shape}")
    backend = resolve_backend(backend)
    if backend not in ("gpu", "gpu_interpret"):
        return reference.row_logsumexp(x)
    tiling = tiling or gpu.Tiling()
    rows, cols = x.shape
    # arrays smaller than one tile (tests, tiny vocabularies): -inf columns add nothing, zero rows
    # are dropped after
    x = jnp.pad(x, [(0, max(0, tiling.block_rows - rows)), (0, max(0, tiling.block_cols - cols))],
                constant_values=((0, 0), (0, -jnp.inf)))
    return gpu.row_logsumexp(x, tiling, interpret=backend == "gpu_interpret")[:rows]
