"""Pallas GPU (Triton lowering) row logsumexp.

One program per ``block_rows`` rows walks their ``V`` columns in ``block_cols``-wide tiles,
keeping the running max ``m`` and the running ``s = sum(exp(x - m))`` per row in fp32 (one
rescale of ``s`` per tile, one ``exp`` per entry), so the input is read once, in its own dtype
(half the bytes for bf16 logits). No tile reads out of bounds: the last column tile is shifted
back to end at ``V`` with the columns already counted masked to ``-inf``, and the last row block is
shifted back to end at ``N`` (rows written twice get the same value). Entries must be finite or
``-inf``; a row of ``-inf`` gives ``-inf``.
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
    """Launch parameters: rows per program, columns per tile (both powers of two), warps and
    software-pipeline stages of the column loop. The default is the fastest of 48 at
    4096 x 248320 on the H200, for bf16 and fp32 alike (docs/performance.md, "Head logsumexp
    kernel")."""

    block_rows: int = 1
    block_cols: int = 4096
    num_warps: int = 4
    num_stages: int = 2


def _merge(m: jax.Array, s: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The running ``(m, s)`` of each row after the fp32 tile ``x [rows, cols]``."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows of -inf so far: no nan from -inf + inf
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
    return m_new, s


def _kernel(x_ref, out_ref, *, rows: int, cols: int, block_rows: int, block_cols: int):
    r0 = jnp.minimum(pl.program_id(0) * block_rows, rows - block_rows)
    row_ids = pl.ds(r0, block_rows)
    full_tiles = cols // block_cols

    def tile(c0) -> jax.Array:
        return x_ref[row_ids, pl.ds(c0, block_cols)].astype(F32)

    def body(j, carry):
        return _merge(*carry, tile(j * block_cols))

    init = (jnp.full((block_rows,), -jnp.inf, F32), jnp.zeros((block_rows,), F32))
    m, s = jax.lax.fori_loop(0, full_tiles, body, init)
    if cols % block_cols:  # the tail: the last tile ending at V, its first columns counted already
        start = cols - block_cols
        col_ids = start + jax.lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
        m, s = _merge(m, s, jnp.where(col_ids >= full_tiles * block_cols, tile(start), -jnp.inf))
    out_ref[row_ids] = m + jnp.log(s)


def row_logsumexp(x: jax.Array, tiling: Tiling, *, interpret: bool = False) -> jax.Array:
    """fp32 ``[N]`` logsumexp of the rows of ``x [N, V]``, ``N >= block_rows``,
    ``V >= block_cols`` (the caller pads smaller arrays)."""
    rows, cols = x.shape
    if rows < tiling.block_rows or cols < tiling.block_cols:
        raise ValueError(f"row_logsumexp kernel: x {x.shape} is smaller than a "
                         f"{tiling.block_rows} x {tiling.block_cols} tile")
    kernel = functools.partial(_kernel, rows=rows, cols=cols, block_rows=tiling.block_rows,
                               block_cols=tiling.block_cols)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(rows, tiling.block_rows),),
        in_specs=[pl.no_block_spec], out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((rows,), F32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                             num_stages=tiling.num_stages),
        interpret=interpret, name="row_logsumexp",
    )(x)
