"""Pallas GPU (Triton lowering) kernels of the grouped matmul.

Rows ``[M, C]`` are sorted by group; group ``g`` owns rows ``[start_g, end_g)`` and multiplies
them by its weights ``[C, D]``. Work is cut into row tiles of ``block_m``; a tile that straddles a
group boundary is visited once per group it holds (a *work item* = (tile, group)), each visit
storing only its own rows, so no tile waits for another and a group of any size, zero included,
costs only the tiles it touches (decoding, with a few rows per expert, reads each used expert's
weights once). There are at most ``tiles + groups`` items; the grid has that many and items past
the real count return at once.

- :func:`grouped_matmul` (``gmm``): ``out[rows of g] = x[rows of g] @ w[g]`` (``w`` may be given
  transposed, ``[G, D, C]``, which is the backward's ``dx = dy @ w[g]^T``).
- :func:`grouped_outer` (``tgmm``): ``dw[g] = x[rows of g]^T @ dy[rows of g]``, one program per
  (group, output tile) looping over the group's row tiles.
bf16 operands, fp32 accumulation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_tiles import dividing_tile

BLOCK_M = 64
BLOCK_C = 64  # contraction
BLOCK_D = 128  # output columns


class WorkItems(NamedTuple):
    """Row-tile work of one grouped matmul: ``group``/``tile`` per item ``[W]``, the real item
    count ``[1]`` and each group's row range ``starts``/``ends [G]``."""

    group: jax.Array
    tile: jax.Array
    count: jax.Array
    starts: jax.Array
    ends: jax.Array


def group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First row and one past the last row of every group ``[G]`` (groups are consecutive)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def work_items(group_sizes: jax.Array, num_tiles: int, block_m: int) -> WorkItems:
    """The (tile, group) pairs that cover every row of every non-empty group, in row order."""
    num_groups = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes)
    sizes = ends - starts
    first = starts // block_m
    per_group = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
    capacity = num_tiles + num_groups
    group = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), per_group,
                       total_repeat_length=capacity)
    offsets = jnp.cumsum(per_group) - per_group
    index = jnp.arange(capacity, dtype=jnp.int32)
    count = jnp.sum(per_group)
    tile = jnp.where(index < count, first[group] + index - offsets[group], 0)
    return WorkItems(group, tile, count.reshape(1), starts, ends)


def _expert_tiles(contract: int, out_cols: int, interpret: bool) -> tuple[int, int]:
    """Contraction and output-column tiles of one expert matrix ``[contract, out_cols]``."""
    what = "the GPU grouped matmul's expert matrix sides"
    return (dividing_tile(contract, BLOCK_C, interpret=interpret, what=what),
            dividing_tile(out_cols, BLOCK_D, interpret=interpret, what=what))


def _gmm_kernel(group_ref, tile_ref, count_ref, starts_ref, ends_ref, x_ref, w_ref, zeros_ref,
                o_ref, *, block_m: int, block_c: int, block_d: int, transpose_w: bool):
    del zeros_ref  # aliased to o_ref: rows no item writes stay zero
    item, j = pl.program_id(0), pl.program_id(1)

    @pl.when(item < count_ref[0])
    def _():
        g = group_ref[item]
        row0 = pl.multiple_of(tile_ref[item] * block_m, block_m)
        rows = row0 + jnp.arange(block_m)
        inside = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        cols = pl.ds(pl.multiple_of(j * block_d, block_d), block_d)

        def body(c, acc):
            cs = pl.ds(pl.multiple_of(c * block_c, block_c), block_c)
            x = x_ref[pl.ds(row0, block_m), cs]
            if transpose_w:
                return acc + plgpu.dot(x, w_ref[g, cols, cs], trans_b=True)
            return acc + plgpu.dot(x, w_ref[g, cs, cols])

        acc = lax.fori_loop(0, x_ref.shape[1] // block_c, body,
                            jnp.zeros((block_m, block_d), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(row0, block_m), cols], acc.astype(o_ref.dtype),
                    mask=inside[:, None])


def _pad_rows(x: jax.Array, block_m: int) -> jax.Array:
    return jnp.pad(x, [(0, -x.shape[0] % block_m), (0, 0)])


def _params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   transpose_w: bool = False, out_dtype=jnp.float32,
                   interpret: bool = False) -> jax.Array:
    """``x [M, C]`` (rows sorted by group) times ``w [G, C, D]`` (``[G, D, C]`` with
    ``transpose_w``) -> ``[M, D]``; rows past ``sum(group_sizes)`` are zero."""
    rows, contract = x.shape
    out_cols = w.shape[1] if transpose_w else w.shape[2]
    block_m = BLOCK_M
    block_c, block_d = _expert_tiles(contract, out_cols, interpret)
    padded = _pad_rows(x, block_m)
    items = work_items(group_sizes, padded.shape[0] // block_m, block_m)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, block_m=block_m, block_c=block_c, block_d=block_d,
                          transpose_w=transpose_w),
        grid=(items.group.shape[0], out_cols // block_d),
        in_specs=[pl.no_block_spec] * 8,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((padded.shape[0], out_cols), out_dtype),
        input_output_aliases={7: 0},
        compiler_params=_params(),
        interpret=interpret,
        name="grouped_matmul",
    )(*items, padded, w, jnp.zeros((padded.shape[0], out_cols), out_dtype))
    return out[:rows]


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, block_m: int, block_c: int,
                 block_d: int):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    cs = pl.ds(pl.multiple_of(i * block_c, block_c), block_c)
    ds = pl.ds(pl.multiple_of(j * block_d, block_d), block_d)

    def body(t, acc):
        row0 = pl.multiple_of(t * block_m, block_m)
        rows = row0 + jnp.arange(block_m)
        inside = ((rows >= start) & (rows < end))[:, None]
        x = jnp.where(inside, x_ref[pl.ds(row0, block_m), cs], 0)
        return acc + plgpu.dot(x, dy_ref[pl.ds(row0, block_m), ds], trans_a=True)

    first = start // block_m
    last = jnp.where(end > start, (end - 1) // block_m + 1, first)
    acc = lax.fori_loop(first, last, body, jnp.zeros((block_c, block_d), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def grouped_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
                  out_dtype=jnp.float32, interpret: bool = False) -> jax.Array:
    """``dw[g] = x[rows of g]^T @ dy[rows of g]``: ``x [M, C]``, ``dy [M, D]`` -> ``[G, C, D]``
    (zero for an empty group)."""
    contract, out_cols = x.shape[1], dy.shape[1]
    num_groups = group_sizes.shape[0]
    block_m = BLOCK_M
    block_c, block_d = _expert_tiles(contract, out_cols, interpret)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m, block_c=block_c, block_d=block_d),
        grid=(num_groups, contract // block_c, out_cols // block_d),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((None, block_c, block_d), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_groups, contract, out_cols), out_dtype),
        compiler_params=_params(),
        interpret=interpret,
        name="grouped_outer",
    )(*group_bounds(group_sizes), _pad_rows(x, block_m), _pad_rows(dy, block_m))
