"""Public cross-entropy logits gradient: validation, backend dispatch, padding of arrays smaller
than one tile."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.ce_logits_grad import gpu, reference


def ce_logits_grad(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array,
                   *, out_dtype: jnp.dtype, backend: str = "auto",
                   tiling: gpu.Tiling | None = None) -> jax.Array:
    """``weights[:, None] * (softmax(logits) - onehot(targets))`` of ``logits [N, V]`` (any float
    dtype, finite), with the softmax formed as ``exp(logits - lse)`` from their fp32 logsumexp
    ``lse [N]``; ``targets [N]`` int (a target outside ``[0, V)`` has no onehot entry: a vocabulary
    shard that does not hold it), ``weights [N]`` fp32. fp32 math, rounded once to ``out_dtype``.

    backend: ``gpu`` runs the Pallas kernel (``gpu_interpret``: in interpret mode); every other
    backend (CPU, TPU) runs the XLA expression (:mod:`.reference`).
    """
    if logits.ndim != 2 or lse.shape != logits.shape[:1] or targets.shape != lse.shape \
            or weights.shape != lse.shape:
        raise ValueError("ce_logits_grad expects logits [N, V] with lse, targets and weights [N], "
                         f"got {logits.shape}, {lse.shape}, {targets.shape}, {weights.shape}")
    lse, targets, weights = lse.astype(jnp.float32), targets.astype(jnp.int32), \
        weights.astype(jnp.float32)
    backend = resolve_backend(backend)
    if backend not in ("gpu", "gpu_interpret"):
        return reference.ce_logits_grad(logits, lse, targets, weights, out_dtype)
    tiling = tiling or gpu.Tiling()
    rows, cols = logits.shape
    extra_rows, extra_cols = max(0, tiling.block_rows - rows), max(0, tiling.block_cols - cols)
    if extra_rows or extra_cols:  # smaller than one tile (tests, tiny vocabularies): cut after
        logits = jnp.pad(logits, [(0, extra_rows), (0, extra_cols)])
        lse, targets, weights = (jnp.pad(a, (0, extra_rows)) for a in (lse, targets, weights))
    out = gpu.ce_logits_grad(logits, lse, targets, weights, out_dtype, tiling,
                             interpret=backend == "gpu_interpret")
    return out[:rows, :cols] if extra_rows or extra_cols else out
