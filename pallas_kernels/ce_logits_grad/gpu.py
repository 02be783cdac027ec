"""Pallas GPU (Triton lowering) cross-entropy logits gradient.

A 2-D grid of ``[block_rows, block_cols]`` tiles; each program reads its tile of the stored
logits once (in their own dtype), the rows' fp32 logsumexp, targets and weights, and writes
``w (exp(x - lse) - onehot)`` in the output dtype: one read and one write per entry. No tile
reads or writes out of bounds: the last column tile is shifted back to end at ``V`` and the last
row block to end at ``N`` (entries written twice get the same value).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32


class Tiling(NamedTuple):
    """Launch parameters: tile rows and columns (powers of two) and Triton's warps
    (``benchmarks/ce_logits_grad.py --sweep`` times others)."""

    block_rows: int = 1
    block_cols: int = 4096
    num_warps: int = 4


def _kernel(x_ref, lse_ref, t_ref, w_ref, out_ref, *, rows: int, cols: int, block_rows: int,
            block_cols: int):
    r0 = jnp.minimum(pl.program_id(0) * block_rows, rows - block_rows)
    c0 = jnp.minimum(pl.program_id(1) * block_cols, cols - block_cols)
    row_ids, col_ids = pl.ds(r0, block_rows), pl.ds(c0, block_cols)
    x = x_ref[row_ids, col_ids].astype(F32)
    ids = c0 + jax.lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
    onehot = jnp.where(ids == t_ref[row_ids][:, None], 1.0, 0.0)
    grad = w_ref[row_ids][:, None] * (jnp.exp(x - lse_ref[row_ids][:, None]) - onehot)
    out_ref[row_ids, col_ids] = grad.astype(out_ref.dtype)


def ce_logits_grad(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array,
                   out_dtype: jnp.dtype, tiling: Tiling, *, interpret: bool = False) -> jax.Array:
    """``[N, V]`` in ``out_dtype`` (arguments as :func:`api.ce_logits_grad` takes them),
    ``N >= block_rows``, ``V >= block_cols`` (the caller pads smaller arrays)."""
    rows, cols = logits.shape
    if rows < tiling.block_rows or cols < tiling.block_cols:
        raise ValueError(f"ce_logits_grad kernel: logits {logits.shape} are smaller than a "
                         f"{tiling.block_rows} x {tiling.block_cols} tile")
    kernel = functools.partial(_kernel, rows=rows, cols=cols, block_rows=tiling.block_rows,
                               block_cols=tiling.block_cols)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(rows, tiling.block_rows), pl.cdiv(cols, tiling.block_cols)),
        in_specs=[pl.no_block_spec] * 4, out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=1),
        interpret=interpret, name="ce_logits_grad",
    )(logits, lse, targets, weights)
