"""Pallas TPU (Mosaic) flash kernels of block-diffusion attention.

Same algorithm as :mod:`pallas_kernels.block_attention.gpu`, in the TPU idiom: the visible tile
lists are scalar-prefetched into SMEM and drive the key/value (or query) BlockSpec index maps, so
the grid's last axis walks a tile's list; steps past the list's count repeat the last block index
(no new DMA) and do no work. Heads-major ``[B, H, T, D]`` operands; softmax statistics are
``[T, 1]`` columns in fp32. Interpret mode (``interpret=True``) runs the same kernels on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_attention import tiles
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout, visible

DEFAULT_BLOCKS = (128, 128)  # (block_q, block_k); block_k is a multiple of the 128 lanes
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _dot(a: jax.Array, b: jax.Array, dims=(((1,), (0,)), ((), ()))) -> jax.Array:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _masked(x: jax.Array, fill: float, partial, qm_ref, km_ref) -> jax.Array:
    """``x`` with invisible entries set to ``fill``; the mask is only evaluated on partial tiles."""

    def apply(x):
        q_meta = [qm_ref[:, f:f + 1] for f in range(4)]
        k_meta = [km_ref[f:f + 1, :] for f in range(4)]
        return jnp.where(visible(*q_meta, *k_meta), x, fill)

    return lax.cond(partial != 0, apply, lambda x: x, x)


def _fwd_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref,
                lse_ref, m_scr, l_scr, acc_scr, *, scale: float, n_k: int):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * pl.num_programs(2) + i

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _step():
        s = _dot(q_ref[...], k_ref[...], NT) * scale
        s = _masked(s, -jnp.inf, partial_ref[row * n_k + t], qm_ref, km_ref)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_scr[...] = m_new

    @pl.when(t == n_k - 1)
    def _finish():
        denom = l_scr[...]
        empty = denom == 0.0
        o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, denom)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(denom))


def _probs(q, k, lse, scale, partial, qm_ref, km_ref) -> jax.Array:
    """Softmax probabilities of a tile recomputed from the forward's log-sum-exp."""
    return _masked(jnp.exp(_dot(q, k, NT) * scale - lse), 0.0, partial, qm_ref, km_ref)


def _dq_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_scr, *, scale: float, n_k: int):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * pl.num_programs(2) + i

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _step():
        k = k_ref[...]
        p = _probs(q_ref[...], k, lse_ref[...], scale, partial_ref[row * n_k + t], qm_ref, km_ref)
        ds = p * (_dot(do_ref[...], v_ref[...], NT) - delta_ref[...])
        dq_scr[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(t == n_k - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(lists_ref, partial_ref, counts_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, scale: float, n_q: int):
    b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    row = b * pl.num_programs(2) + j

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(t < counts_ref[row])
    def _step():
        q, do = q_ref[...], do_ref[...]
        p = _probs(q, k_ref[...], lse_ref[...], scale, partial_ref[row * n_q + t], qm_ref, km_ref)
        dv_scr[...] += _dot(p.astype(do.dtype).T, do)
        ds = p * (_dot(do, v_ref[...], NT) - delta_ref[...])
        dk_scr[...] += _dot(ds.astype(q.dtype).T, q)

    @pl.when((g == pl.num_programs(3) - 1) & (t == n_q - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _prepare(q, k, q_layout, kv_layout, blocks):
    """Tile sizes, padded lengths and padded layouts (padded queries and keys see nothing real)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    block_q, block_k = blocks or DEFAULT_BLOCKS
    bq, bk = min(block_q, _round_up(q.shape[1], 8)), min(block_k, _round_up(k.shape[1], 8))
    tq, tk = _round_up(q.shape[1], bq), _round_up(k.shape[1], bk)
    q_layout = tiles.pad_layout(q_layout, tq, tiles.PAD_QUERY_SEGMENT)
    kv_layout = tiles.pad_layout(kv_layout, tk, EMPTY_SEGMENT)
    return bq, bk, q_layout, kv_layout


def _heads_major(x: jax.Array, length: int) -> jax.Array:
    """``[B, T, H, D]`` -> zero-padded ``[B, H, length, D]``."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)


def _q_meta(layout: TokenLayout) -> jax.Array:
    """``int32 [B, T, 4]``: query metadata as columns (segment, position, block, noisy)."""
    fields = (layout.segment_ids, layout.positions, layout.block_ids, layout.noisy)
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=-1)


def _kv_meta(layout: TokenLayout) -> jax.Array:
    """``int32 [B, 4, T]``: key metadata as rows."""
    return _q_meta(layout).transpose(0, 2, 1)


def _flat_lists(maybe: jax.Array, full: jax.Array):
    return tuple(x.reshape(-1) for x in tiles.tile_lists(maybe, full))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
            kv_layout: TokenLayout, *, scale: float, interpret: bool = False,
            blocks: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """Output ``[B, Tq, Hq, D]`` and natural log-sum-exp of scaled scores ``[B, Hq, Tq, 1]``."""
    batch, seq_q, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    bq, bk, q_layout, kv_layout = _prepare(q, k, q_layout, kv_layout, blocks)
    tq, tk = q_layout.shape[1], kv_layout.shape[1]
    n_q, n_k = tq // bq, tk // bk
    lists = _flat_lists(*tiles.tile_visibility(q_layout, kv_layout, bq, bk))

    def kv_index(b, h, i, t, lists, partial, counts):
        return b, h // groups, lists[(b * n_q + i) * n_k + t], 0

    def q_index(b, h, i, t, *_):
        return b, h, i, 0

    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, n_k=n_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, n_q, n_k),
            in_specs=[
                pl.BlockSpec((None, None, bq, head_dim), q_index),
                pl.BlockSpec((None, None, bk, head_dim), kv_index),
                pl.BlockSpec((None, None, bk, head_dim), kv_index),
                pl.BlockSpec((None, bq, 4), lambda b, h, i, t, *_: (b, i, 0)),
                pl.BlockSpec((None, 4, bk), lambda b, h, i, t, lists, *_: (
                    b, 0, lists[(b * n_q + i) * n_k + t])),
            ],
            out_specs=[pl.BlockSpec((None, None, bq, head_dim), q_index),
                       pl.BlockSpec((None, None, bq, 1), q_index)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, tq, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_attention_fwd_tpu",
    )(*lists, _heads_major(q, tq), _heads_major(k, tk), _heads_major(v, tk), _q_meta(q_layout),
      _kv_meta(kv_layout))
    return out.transpose(0, 2, 1, 3)[:, :seq_q], lse[:, :, :seq_q]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
             kv_layout: TokenLayout, out: jax.Array, lse: jax.Array, d_out: jax.Array, *,
             scale: float, interpret: bool = False,
             blocks: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv)`` of the forward from its output, log-sum-exp and ``d_out``."""
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk, q_layout, kv_layout = _prepare(q, k, q_layout, kv_layout, blocks)
    tq, tk = q_layout.shape[1], kv_layout.shape[1]
    n_q, n_k = tq // bq, tk // bk
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    pad_stat = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, tq - seq_q), (0, 0)))
    lse, delta = pad_stat(lse), pad_stat(delta[..., None])
    qt, dot_ = _heads_major(q, tq), _heads_major(d_out.astype(q.dtype), tq)
    kt, vt = _heads_major(k, tk), _heads_major(v, tk)
    q_meta, kv_meta = _q_meta(q_layout), _kv_meta(kv_layout)
    maybe, full = tiles.tile_visibility(q_layout, kv_layout, bq, bk)

    def kv_index(b, h, i, t, lists, *_):
        return b, h // groups, lists[(b * n_q + i) * n_k + t], 0

    def q_index(b, h, i, t, *_):
        return b, h, i, 0

    q_spec = pl.BlockSpec((None, None, bq, head_dim), q_index)
    stat_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, n_k=n_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, n_q, n_k),
            in_specs=[q_spec, pl.BlockSpec((None, None, bk, head_dim), kv_index),
                      pl.BlockSpec((None, None, bk, head_dim), kv_index),
                      pl.BlockSpec((None, bq, 4), lambda b, h, i, t, *_: (b, i, 0)),
                      pl.BlockSpec((None, 4, bk), lambda b, h, i, t, lists, *_: (
                          b, 0, lists[(b * n_q + i) * n_k + t])),
                      q_spec, stat_spec, stat_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_attention_dq_tpu",
    )(*_flat_lists(maybe, full), qt, kt, vt, q_meta, kv_meta, dot_, lse, delta)

    def q_tile(b, j, t, lists):
        return lists[(b * n_k + j) * n_q + t]

    def gq_index(b, h, j, g, t, lists, *_):
        return b, h * groups + g, q_tile(b, j, t, lists), 0

    def k_index(b, h, j, g, t, *_):
        return b, h, j, 0

    gq_spec = pl.BlockSpec((None, None, bq, head_dim), gq_index)
    gstat_spec = pl.BlockSpec((None, None, bq, 1), gq_index)
    k_spec = pl.BlockSpec((None, None, bk, head_dim), k_index)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, n_q=n_q),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, n_k, groups, n_q),
            in_specs=[gq_spec, k_spec, k_spec,
                      pl.BlockSpec((None, bq, 4), lambda b, h, j, g, t, lists, *_: (
                          b, q_tile(b, j, t, lists), 0)),
                      pl.BlockSpec((None, 4, bk), lambda b, h, j, g, t, *_: (b, 0, j)),
                      gq_spec, gstat_spec, gstat_spec],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                            pltpu.VMEM((bk, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(
            "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="block_attention_dkv_tpu",
    )(*_flat_lists(jnp.swapaxes(maybe, 1, 2), jnp.swapaxes(full, 1, 2)), qt, kt, vt, q_meta,
      kv_meta, dot_, lse, delta)
    to_tokens = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]
    return to_tokens(dq, seq_q), to_tokens(dk, seq_k), to_tokens(dv, seq_k)
