"""Pallas GPU (Triton lowering) flash kernels of block-diffusion attention.

Three kernels: forward (per query tile, online softmax over its visible key tiles), dq (per query
tile) and dk/dv (per key tile, looping over the query heads of its kv head). The visible tile lists
come from :mod:`pallas_kernels.block_attention.tiles`; inside a partially visible tile the mask is
:func:`pallas_kernels.block_attention.mask.visible` on the tiles' metadata (fully visible tiles skip
it). Scores, softmax statistics and accumulators are fp32; matmul inputs keep the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_attention import tiles
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout, visible

LOG2E = math.log2(math.e)
MIN_TILE = 16  # smallest tile a Triton dot accepts
MAX_TILE = 128  # sequences are padded to a multiple of their largest tile
ALL = slice(None)


class Tiling(NamedTuple):
    """Tile shape (query and key tokens per tile), Triton launch parameters and launch order of one
    kernel: ``side_by_side`` grid rows (batch, head) take each tile together (:class:`_Schedule`;
    lowered to a divisor of the row count)."""

    block_q: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 2
    side_by_side: int = 1


class _Schedule(NamedTuple):
    """The order in which a kernel's programs over ``(tile, batch, head)`` start.

    The GPU starts programs in grid order (axis 0 fastest) and the last ones started set the
    kernel's tail, so the costliest tiles go first: under causal-like masks a late query tile
    sees the most keys (``descending``) and an early key tile is seen by the most queries.
    ``side_by_side`` consecutive rows ``batch * heads + head`` take each tile together, so that
    a row's first (costliest) programs do not all start after the previous rows' cheap ones.
    """

    tiles: int
    batch: int
    heads: int
    side_by_side: int
    descending: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.side_by_side, self.tiles, self.batch * self.heads // self.side_by_side

    def ids(self, x, t, z) -> tuple:
        """``(tile, batch, head)`` of grid point ``(x, t, z)``."""
        row = z * self.side_by_side + x
        tile = self.tiles - 1 - t if self.descending else t
        return tile, row // self.heads, row % self.heads

    def program(self) -> tuple:
        """``(tile, batch, head)`` of the running program."""
        return self.ids(*(pl.program_id(axis) for axis in range(3)))

    def spec(self, block_shape: tuple, block_index) -> pl.BlockSpec:
        """A BlockSpec whose ``block_index(tile, batch, head)`` is given in kernel terms."""
        return pl.BlockSpec(block_shape, lambda x, t, z: block_index(*self.ids(x, t, z)))


MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions


def _schedule(tiling: Tiling, tiles: int, batch: int, heads: int, descending: bool) -> _Schedule:
    order = _Schedule(tiles, batch, heads, math.gcd(tiling.side_by_side, batch * heads),
                      descending)
    if max(order.grid[1:]) > MAX_GRID_YZ:
        raise ValueError(f"GPU block attention launches at most {MAX_GRID_YZ} tiles per row and "
                         f"{MAX_GRID_YZ} groups of (batch, head) rows, got grid {order.grid} "
                         f"(batch {batch}, heads {heads}, tiles {tiles}); split the call")
    return order


# Per kernel and head dim. D=256: the fastest of `benchmarks/block_attention.py --sweep 4096
# --batch 4` (the 0.8B train step's FLARE rows) on an H200, backward 7.27 ms at the earlier
# defaults (dq and dkv both (128, 32, 8 warps, 2 stages)); dkv (128, 64) fits shared memory only
# at one stage. D<=128: the same accumulator bytes per program (not timed; compiled and checked on
# the H100 for D=64/128 with fwd (128, 64), dq (128, 64), dkv (64, 128)). Launch order, D=256:
# dk/dv with 4 (batch, kv head) rows side by side was the fastest of 1/2/4/8 in `--orders 4096`
# on an H200 (backward 6.21 ms against 6.71 with the rows one after another); for the query-tile
# kernels one row at a time, last tiles first, was the fastest, within the sweep's spread.
FWD_TILES = {64: Tiling(128, 64, 4), 128: Tiling(128, 64), 256: Tiling(128, 64)}
DQ_TILES = {64: Tiling(128, 64, 4), 128: Tiling(128, 64), 256: Tiling(64, 64, 4)}
DKV_TILES = {64: Tiling(128, 64, 4), 128: Tiling(128, 64), 256: Tiling(128, 64, 8, 1, 4)}


def _metadata(layout: TokenLayout) -> jax.Array:
    """Stack the layout fields into ``int32 [B, 4, T]`` (segment, position, block, noisy)."""
    fields = (layout.segment_ids, layout.positions, layout.block_ids, layout.noisy)
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=1)


def _tile(length: int, block: int) -> int:
    """Tile size for a sequence: ``block``, shrunk (to a power of two >= 16) for short sequences."""
    return max(MIN_TILE, min(block, pl.next_power_of_2(length)))


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad axis 1 of ``x`` to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _padded_length(length: int) -> int:
    block = _tile(length, MAX_TILE)
    return pl.cdiv(length, block) * block


def _masked(x: jax.Array, fill: float, partial, qm_ref, q_slice, km_ref, k_slice) -> jax.Array:
    """``x`` with invisible entries set to ``fill``; the mask is only evaluated on partial tiles."""

    def apply(x):
        q_meta = [qm_ref[f, q_slice][:, None] for f in range(4)]
        k_meta = [km_ref[f, k_slice][None, :] for f in range(4)]
        return jnp.where(visible(*q_meta, *k_meta), x, fill)

    return lax.cond(partial != 0, apply, lambda x: x, x)


def _fwd_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref,
                lse_ref, *, scale: float, block_k: int, schedule: _Schedule):
    i, b, _ = schedule.program()
    q = q_ref[...]
    block_q, head_dim = q.shape

    def body(t, carry):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(pl.multiple_of(lists_ref[b, i, t] * block_k, block_k), block_k)
        s = plgpu.dot(q, k_ref[k_slice, :], trans_b=True) * (scale * LOG2E)
        s = _masked(s, -jnp.inf, partial_ref[b, i, t], qm_ref, ALL, km_ref, k_slice)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m_prev - m_safe)
        v = v_ref[k_slice, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l_prev + p.sum(axis=-1)

    init = (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, denom = lax.fori_loop(0, counts_ref[b, i], body, init)
    empty = denom == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(denom))


def _dq_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale: float, block_k: int, schedule: _Schedule):
    i, b, _ = schedule.program()
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(t, dq):
        k_slice = pl.ds(pl.multiple_of(lists_ref[b, i, t] * block_k, block_k), block_k)
        k, v = k_ref[k_slice, :], v_ref[k_slice, :]
        p = jnp.exp2(plgpu.dot(q, k, trans_b=True) * (scale * LOG2E) - lse)
        p = _masked(p, 0.0, partial_ref[b, i, t], qm_ref, ALL, km_ref, k_slice)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, counts_ref[b, i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, block_q: int, groups: int,
                schedule: _Schedule):
    j, b, _ = schedule.program()
    k, v = k_ref[...], v_ref[...]

    def body(t, carry, g):
        dk, dv = carry
        q_slice = pl.ds(pl.multiple_of(lists_ref[b, j, t] * block_q, block_q), block_q)
        q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
        p = jnp.exp2(plgpu.dot(q, k, trans_b=True) * (scale * LOG2E)
                     - lse_ref[g, q_slice][:, None])
        p = _masked(p, 0.0, partial_ref[b, j, t], qm_ref, q_slice, km_ref, ALL)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[g, q_slice][:, None])
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    def head(g, carry):
        return lax.fori_loop(0, counts_ref[b, j], functools.partial(body, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _check(q: jax.Array, k: jax.Array) -> None:
    head_dim = q.shape[-1]
    if head_dim != pl.next_power_of_2(head_dim) or head_dim < MIN_TILE:
        raise ValueError(f"GPU block attention needs a power-of-two head dim >= 16, got {head_dim}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")


def _pad_layouts(q_layout, kv_layout):
    """Pad layouts to whole tiles; padded queries and keys see nothing real."""
    q_layout = tiles.pad_layout(q_layout, _padded_length(q_layout.shape[1]),
                                tiles.PAD_QUERY_SEGMENT)
    kv_layout = tiles.pad_layout(kv_layout, _padded_length(kv_layout.shape[1]), EMPTY_SEGMENT)
    return q_layout, kv_layout


def _tiling(requested: Tiling | None, table: dict[int, Tiling], head_dim: int, seq_q: int,
            seq_k: int) -> tuple[int, int, plgpu.CompilerParams, Tiling]:
    """``(block_q, block_k, compiler params, tiling)`` of one kernel: requested or tabled, the
    tiles shrunk to fit the (padded) sequences."""
    tiling = requested or table.get(head_dim, Tiling(64, 64, 4 if head_dim <= 64 else 8))
    for block in tiling[:2]:
        if block != pl.next_power_of_2(block) or not MIN_TILE <= block <= MAX_TILE:
            raise ValueError(f"tile sizes must be powers of two in [16, 128], got {block}")
    params = plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return _tile(seq_q, tiling.block_q), _tile(seq_k, tiling.block_k), params, tiling


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
            kv_layout: TokenLayout, *, scale: float, interpret: bool = False,
            tiling: Tiling | None = None) -> tuple[jax.Array, jax.Array]:
    """Output ``[B, Tq, Hq, D]`` and base-2 log-sum-exp of the scaled scores ``[B, Hq, Tq]``.

    ``tiling``: tile shape and launch parameters; default from ``FWD_TILES``.
    """
    _check(q, k)
    batch, seq_q, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    q_layout, kv_layout = _pad_layouts(q_layout, kv_layout)
    tq, tk = q_layout.shape[1], kv_layout.shape[1]
    bq, bk, params, tiling = _tiling(tiling, FWD_TILES, head_dim, seq_q, k.shape[1])
    lists = tiles.tile_lists(*tiles.tile_visibility(q_layout, kv_layout, bq, bk))
    order = _schedule(tiling, tq // bq, batch, heads, descending=True)
    kv_spec = order.spec((None, tk, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    q_spec = order.spec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=bk, schedule=order),
        grid=order.grid,
        in_specs=[pl.no_block_spec] * 3 + [
            q_spec, kv_spec, kv_spec,
            order.spec((None, 4, bq), lambda i, b, h: (b, 0, i)),
            order.spec((None, 4, tk), lambda i, b, h: (b, 0, 0))],
        out_specs=[q_spec, order.spec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((batch, tq, heads, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="block_attention_fwd",
    )(*lists, _pad_tokens(q, tq), _pad_tokens(k, tk), _pad_tokens(v, tk), _metadata(q_layout),
      _metadata(kv_layout))
    return out[:, :seq_q], lse[:, :, :seq_q]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
             kv_layout: TokenLayout, out: jax.Array, lse: jax.Array, d_out: jax.Array, *,
             scale: float, interpret: bool = False, dq_tiling: Tiling | None = None,
             dkv_tiling: Tiling | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv)`` of the forward from its output, log-sum-exp and ``d_out``.

    ``dq_tiling`` / ``dkv_tiling``: tile shapes and launch parameters of the two kernels (default
    from ``DQ_TILES`` / ``DKV_TILES``).
    """
    _check(q, k)
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q_layout, kv_layout = _pad_layouts(q_layout, kv_layout)
    tq, tk = q_layout.shape[1], kv_layout.shape[1]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    pad_stat = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, tq - seq_q)))
    lse, delta = pad_stat(lse), pad_stat(delta)
    qp, dop = _pad_tokens(q, tq), _pad_tokens(d_out.astype(q.dtype), tq)
    kp, vp = _pad_tokens(k, tk), _pad_tokens(v, tk)
    q_meta, kv_meta = _metadata(q_layout), _metadata(kv_layout)

    bq, bk, params, tiling = _tiling(dq_tiling, DQ_TILES, head_dim, seq_q, seq_k)
    lists = tiles.tile_lists(*tiles.tile_visibility(q_layout, kv_layout, bq, bk))
    order = _schedule(tiling, tq // bq, batch, heads, descending=True)
    q_spec = order.spec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = order.spec((None, tk, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
    stat_spec = order.spec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, schedule=order),
        grid=order.grid,
        in_specs=[pl.no_block_spec] * 3 + [
            q_spec, kv_spec, kv_spec,
            order.spec((None, 4, bq), lambda i, b, h: (b, 0, i)),
            order.spec((None, 4, tk), lambda i, b, h: (b, 0, 0)),
            q_spec, stat_spec, stat_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="block_attention_dq",
    )(*lists, qp, kp, vp, q_meta, kv_meta, dop, lse, delta)

    bq, bk, params, tiling = _tiling(dkv_tiling, DKV_TILES, head_dim, seq_q, seq_k)
    maybe, full = tiles.tile_visibility(q_layout, kv_layout, bq, bk)
    lists = tiles.tile_lists(jnp.swapaxes(maybe, 1, 2), jnp.swapaxes(full, 1, 2))
    order = _schedule(tiling, tk // bk, batch, kv_heads, descending=False)
    grouped = lambda x: x.reshape(batch, tq, kv_heads, groups, head_dim)
    grouped_spec = order.spec((None, tq, None, groups, head_dim), lambda j, b, h: (b, 0, h, 0, 0))
    grouped_stat = lambda x: x.reshape(batch, kv_heads, groups, tq)
    grouped_stat_spec = order.spec((None, None, groups, tq), lambda j, b, h: (b, h, 0, 0))
    k_spec = order.spec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, groups=groups, schedule=order),
        grid=order.grid,
        in_specs=[pl.no_block_spec] * 3 + [
            grouped_spec, k_spec, k_spec,
            order.spec((None, 4, tq), lambda j, b, h: (b, 0, 0)),
            order.spec((None, 4, bk), lambda j, b, h: (b, 0, j)),
            grouped_spec, grouped_stat_spec, grouped_stat_spec],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="block_attention_dkv",
    )(*lists, grouped(qp), kp, vp, q_meta, kv_meta, grouped(dop), grouped_stat(lse),
      grouped_stat(delta))
    return dq[:, :seq_q], dk[:, :seq_k], dv[:, :seq_k]
