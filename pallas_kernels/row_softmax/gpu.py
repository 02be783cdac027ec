"""Pallas GPU (Triton lowering) row softmax terms: ``exp(x - m)``, written once, and its row sums.

One program per ``block_rows`` rows walks their ``V`` columns in ``block_cols``-wide tiles. Each
row's offset ``m`` is fixed before the walk: the larger of the caller's ``offset`` (the target's
logit in the cross-entropy, ``-inf`` for none) and the max of the row's first tile. The walk
writes ``exp(x - m)`` (when asked, in ``exp_dtype``) and sums it in fp32, one ``exp`` per entry,
and keeps the row's max ``M``. So the input is read once and the exponentials written once, and
no tile is rescaled after it is written. A row block where some ``|M - m|`` exceeds
:data:`HEADROOM` (``exp(x - m)`` could leave the range where bf16 / fp32 sums and products stay
normal) walks its columns once more from ``m = M``; logits of a trained head rarely need it.

No tile reads out of bounds: the last column tile is shifted back to end at ``V``, its columns
already counted masked out of the sum (their exponentials are written again, with the same
values), and the last row block is shifted back to end at ``N`` (rows written twice get the same
values). Entries must be finite or ``-inf``, with at least one finite entry per row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
# Largest |row max - offset| the single walk accepts: exponentials up to e^30 ~ 1e13 and row sums up
# to V e^30 (~3e18 at 248320 ids), so 1 / sum times bf16 values stays far above fp32's smallest
# normal, and exponentials of entries within 57 of the row max stay normal.
HEADROOM = 30.0


class Tiling(NamedTuple):
    """Launch parameters: rows per program, columns per tile (both powers of two), warps and
    software-pipeline stages of the column loop. The default is within 0.3% of the fastest of 24
    at 4096 x 248320 bf16 on the H100 (docs/performance.md, "The head's softmax terms in one
    pass")."""

    block_rows: int = 1
    block_cols: int = 4096
    num_warps: int = 4
    num_stages: int = 2


def _kernel(x_ref, offset_ref, *refs, rows: int, cols: int, block_rows: int, block_cols: int,
            write: bool):
    e_ref, (lse_ref, m_ref) = (refs[0], refs[1:]) if write else (None, refs)
    r0 = jnp.minimum(pl.program_id(0) * block_rows, rows - block_rows)
    row_ids = pl.ds(r0, block_rows)
    full_tiles, tail_start = cols // block_cols, cols - block_cols

    def tile(c0) -> jax.Array:
        return x_ref[row_ids, pl.ds(c0, block_cols)].astype(F32)

    def visit(c0, m, counted=None):
        """Write one tile's exponentials; its ``(sum, max)`` over the columns not ``counted``."""
        x = tile(c0)
        ex = jnp.exp(x - m[:, None])
        if write:
            e_ref[row_ids, pl.ds(c0, block_cols)] = ex.astype(e_ref.dtype)
        if counted is not None:
            ex = jnp.where(counted, 0.0, ex)
        return jnp.sum(ex, axis=1), jnp.max(x, axis=1)

    def walk(m: jax.Array) -> tuple[jax.Array, jax.Array]:
        def body(j, carry):
            s, mx = visit(j * block_cols, m)
            return carry[0] + s, jnp.maximum(carry[1], mx)

        init = (jnp.zeros((block_rows,), F32), jnp.full((block_rows,), -jnp.inf, F32))
        s, mx = jax.lax.fori_loop(0, full_tiles, body, init)
        if cols % block_cols:  # the tail: the last tile ending at V, its first columns counted
            col_ids = tail_start + jax.lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
            s_tail, mx_tail = visit(tail_start, m, counted=col_ids < full_tiles * block_cols)
            s, mx = s + s_tail, jnp.maximum(mx, mx_tail)
        return s, mx

    m = jnp.maximum(offset_ref[row_ids], jnp.max(tile(0), axis=1))
    s, mx = walk(m)
    again = jnp.max(jnp.abs(mx - m)) > HEADROOM
    m, s = jax.lax.cond(again, lambda: (mx, walk(mx)[0]), lambda: (m, s))
    lse_ref[row_ids] = m + jnp.log(s)
    m_ref[row_ids] = m


def row_softmax(x: jax.Array, offset: jax.Array, exp_dtype: jnp.dtype | None, tiling: Tiling, *,
                interpret: bool = False) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """``(exp(x - m) in exp_dtype or None, logsumexp [N], m [N])`` of ``x [N, V]`` (fp32
    results but the first), ``m`` per row as the module says; ``N >= block_rows``,
    ``V >= block_cols`` (the caller pads smaller arrays)."""
    rows, cols = x.shape
    if rows < tiling.block_rows or cols < tiling.block_cols:
        raise ValueError(f"row_softmax kernel: x {x.shape} is smaller than a "
                         f"{tiling.block_rows} x {tiling.block_cols} tile")
    write = exp_dtype is not None
    kernel = functools.partial(_kernel, rows=rows, cols=cols, block_rows=tiling.block_rows,
                               block_cols=tiling.block_cols, write=write)
    per_row = jax.ShapeDtypeStruct((rows,), F32)
    out_shape = ([jax.ShapeDtypeStruct(x.shape, exp_dtype)] if write else []) + [per_row, per_row]
    outs = pl.pallas_call(
        kernel, grid=(pl.cdiv(rows, tiling.block_rows),),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=[pl.no_block_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                             num_stages=tiling.num_stages),
        interpret=interpret, name="row_softmax",
    )(x, offset.astype(F32))
    return (outs[0] if write else None), outs[-2], outs[-1]
