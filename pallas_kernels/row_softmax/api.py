"""Public row softmax terms: backend dispatch, padding of arrays smaller than one tile."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.row_softmax import gpu, reference


class RowSoftmax(NamedTuple):
    """``softmax(x) = exp * exp(offset - lse)`` row by row (``exp`` None where not asked for)."""

    exp: jax.Array | None  # [N, V], exp(x - offset)
    lse: jax.Array  # [N] fp32 logsumexp
    offset: jax.Array  # [N] fp32


def row_softmax(x: jax.Array, offset: jax.Array | None = None, *,
                exp_dtype: jnp.dtype | None = None, backend: str = "auto",
                tiling: gpu.Tiling | None = None) -> RowSoftmax:
    """The softmax terms of the rows of ``x [N, V]`` (any float dtype; finite or ``-inf``
    entries, one finite entry per row at least): the fp32 logsumexp and, with ``exp_dtype``,
    ``exp(x - offset)`` in that dtype, each row's offset within
    :data:`~pallas_kernels.row_softmax.gpu.HEADROOM` of its max (the row max on the oracle;
    on the kernel the larger of ``offset [N]``, a hint such as the target's logit, and the max
    of the row's first tile, unless that is too far from the row max). Not differentiable (its
    callers form their own gradients).

    backend: ``gpu`` runs the Pallas kernel (``gpu_interpret``: in interpret mode); every other
    backend (CPU, TPU) runs XLA (:mod:`.reference`).
    """
    if x.ndim != 2 or (offset is not None and offset.shape != x.shape[:1]):
        raise ValueError(f"row_softmax expects x [N, V] and offset [N], got shapes {x.shape} "
                         f"and {None if offset is None else offset.shape}")
    backend = resolve_backend(backend)
    if backend not in ("gpu", "gpu_interpret"):
        return RowSoftmax(*reference.row_softmax(x, exp_dtype))
    tiling = tiling or gpu.Tiling()
    rows, cols = x.shape
    offset = jnp.full((rows,), -jnp.inf, jnp.float32) if offset is None else offset
    # arrays smaller than one tile (tests, tiny vocabularies): -inf columns add nothing, zero rows
    # are dropped after
    row_pad, col_pad = max(0, tiling.block_rows - rows), max(0, tiling.block_cols - cols)
    x = jnp.pad(x, [(0, row_pad), (0, col_pad)], constant_values=((0, 0), (0, -jnp.inf)))
    exp, lse, m = gpu.row_softmax(x, jnp.pad(offset, (0, row_pad)), exp_dtype, tiling,
                                  interpret=backend == "gpu_interpret")
    return RowSoftmax(None if exp is None else exp[:rows, :cols], lse[:rows], m[:rows])
