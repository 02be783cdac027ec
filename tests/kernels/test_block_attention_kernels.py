"""Pallas kernels (interpret mode on CPU) against the jnp reference: values, gradients, leakage."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_attention_reference import (
    assert_no_leakage,
    decode_case,
    flare_row,
    qkv,
    rule_mask,
)

from pallas_kernels.block_attention import gpu, tiles, tpu
from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout, dense_mask

BACKENDS = ["gpu_interpret", "tpu_interpret"]
KERNELS = {"gpu_interpret": gpu, "tpu_interpret": tpu}
# non-square tiles of 16/32 tokens (the GPU backward takes its two kernels' tiles separately)
SMALL_FWD_TILES = {"gpu_interpret": dict(tiling=gpu.Tiling(16, 32)),
                   "tpu_interpret": dict(blocks=(16, 32))}
SMALL_BWD_TILES = {"gpu_interpret": dict(dq_tiling=gpu.Tiling(16, 32),
                                         dkv_tiling=gpu.Tiling(32, 16)),
                   "tpu_interpret": dict(blocks=(16, 32))}

# tolerance: both sides are fp32; the kernels sum in another order (online softmax over tiles),
# so values and gradients agree to a few fp32 ulps of O(1) numbers.
TOL = dict(rtol=1e-5, atol=1e-5)


def loss_and_grads(backend: str, q, k, v, q_layout, kv_layout, scale=None):
    """Output and gradients of a random linear functional of it (exercises every output entry)."""
    w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape, np.float32))

    def loss(q, k, v):
        out = block_attention(q, k, v, q_layout, kv_layout, scale=scale, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_matches_reference(backend, q, k, v, q_layout, kv_layout, scale=None, tol=TOL):
    """Kernel output and gradients equal the reference's; returns the kernel's (out, grads)."""
    out, grads = loss_and_grads(backend, q, k, v, q_layout, kv_layout, scale)
    ref_out, ref_grads = loss_and_grads("reference", q, k, v, q_layout, kv_layout, scale)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(r, np.float32), **tol, err_msg=f"d{name}"
        )
    return out, grads


def stack_rows(*layouts: TokenLayout) -> TokenLayout:
    """Batch single-row layouts (rows of one call may follow different attention forms)."""
    return jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=0), *layouts)


def packed_causal(lengths: list[int]) -> TokenLayout:
    seg = np.repeat(np.arange(len(lengths)), lengths)[None]
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    return TokenLayout.causal(jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32))


def batch_qkv(seed: int, batch: int, tq: int, tk: int, **kw):
    return tuple(
        jnp.concatenate(xs, axis=0)
        for xs in zip(*(qkv(seed + r, tq, tk, **kw) for r in range(batch)), strict=True)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_rows_small_tiles_match_reference(backend):
    """Row 0: FLARE row, documents starting mid-block; row 1: packed causal documents. GQA 4:2.

    16/32-token tiles (non-square, several per document): many tiles are skipped, many take the
    unmasked fast path, and T = 200 is padded to whole tiles.
    """
    layout = stack_rows(flare_row([37, 50, 13], block_size=8), packed_causal([30, 120, 50]))
    q, k, v = batch_qkv(10, 2, 200, 200, hq=4, hkv=2, d=16)
    kernel = KERNELS[backend]
    forward = jax.jit(functools.partial(kernel.forward, scale=0.3, interpret=True,
                                        **SMALL_FWD_TILES[backend]))
    backward = jax.jit(functools.partial(kernel.backward, scale=0.3, interpret=True,
                                         **SMALL_BWD_TILES[backend]))
    reference = lambda *a: block_attention(*a, layout, layout, scale=0.3, backend="reference")
    out, lse = forward(q, k, v, layout, layout)
    d_out = jnp.asarray(np.random.default_rng(3).standard_normal(out.shape, np.float32))
    ref_out, vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(out, ref_out, **TOL)
    grads = backward(q, k, v, layout, layout, out, lse, d_out)
    for name, g, r in zip("qkv", grads, vjp(d_out), strict=True):
        np.testing.assert_allclose(g, r, **TOL, err_msg=f"d{name}")


def test_gpu_launch_order_does_not_change_results():
    """Every launch order (rows side by side: 1, 2, all 8; 3 falls back to a divisor) gives the
    kernels' results bit for bit: each program computes the same tile whatever starts first."""
    layout = stack_rows(flare_row([37, 50, 13], block_size=8), packed_causal([30, 120, 50]))
    q, k, v = batch_qkv(11, 2, 200, 200, hq=4, hkv=2, d=16)
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape, np.float32))

    @functools.partial(jax.jit, static_argnums=0)
    def run(side_by_side: int):
        fwd, dq, dkv = (gpu.Tiling(*tile, side_by_side=side_by_side)
                        for tile in ((16, 32), (16, 32), (32, 16)))
        out, lse = gpu.forward(q, k, v, layout, layout, scale=0.3, interpret=True, tiling=fwd)
        return (out, *gpu.backward(q, k, v, layout, layout, out, lse, d_out, scale=0.3,
                                   interpret=True, dq_tiling=dq, dkv_tiling=dkv))

    first = run(1)
    for side_by_side in (2, 3, 8):
        for name, got, want in zip(("out", "dq", "dk", "dv"), run(side_by_side), first, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"{name}, {side_by_side} side by side")


def test_gpu_schedule_starts_costliest_tiles_first():
    """The schedule visits every (tile, batch, head) once; with causal-like masks the first
    programs are the last query tiles (or the first key tiles) of ``side_by_side`` rows."""
    order = gpu._Schedule(tiles=5, batch=2, heads=4, side_by_side=4, descending=True)
    assert order.grid == (4, 5, 2)
    visits = [order.ids(x, t, z) for z in range(2) for t in range(5) for x in range(4)]
    assert sorted(visits) == [(i, b, h) for i in range(5) for b in range(2) for h in range(4)]
    assert visits[:5] == [(4, 0, 0), (4, 0, 1), (4, 0, 2), (4, 0, 3), (3, 0, 0)]
    keys_first = gpu._Schedule(tiles=5, batch=2, heads=2, side_by_side=2, descending=False)
    assert [keys_first.ids(x, 0, 1) for x in range(2)] == [(0, 1, 0), (0, 1, 1)]
    with pytest.raises(ValueError, match="grid"):
        gpu._schedule(gpu.Tiling(16, 16), tiles=4, batch=70000, heads=1, descending=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_and_denoise_with_empty_query(backend):
    """Row 0: decode queries vs a part-filled cache; row 1: a noisy block (denoise). GQA 4:1."""
    decode_q, decode_kv = decode_case(tq=5, tk=40, filled=21)
    denoise_q, denoise_kv = decode_case(tq=5, tk=40, filled=24, noisy_queries=True)
    q_layout, kv_layout = stack_rows(decode_q, denoise_q), stack_rows(decode_kv, denoise_kv)
    # one query of an unknown document sees nothing: its output and gradients must be exactly 0
    q_layout = TokenLayout(
        q_layout.segment_ids.at[0, 2].set(9), q_layout.positions, q_layout.block_ids, q_layout.noisy
    )
    q, k, v = batch_qkv(13, 2, 5, 40, hq=4, hkv=1, d=16)
    out, (dq, _, _) = assert_matches_reference(backend, q, k, v, q_layout, kv_layout)
    assert np.all(np.asarray(out[0, 2]) == 0.0) and np.all(np.asarray(dq[0, 2]) == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_fp32_reference(backend):
    layout = flare_row([48, 16], block_size=16)
    q, k, v = qkv(14, 128, 128, hq=4, hkv=2, d=64, dtype=jnp.bfloat16)
    out = block_attention(q, k, v, layout, layout, backend=backend)
    assert out.dtype == jnp.bfloat16
    ref = block_attention(*(a.astype(jnp.float32) for a in (q, k, v)), layout, layout, backend="reference")
    # tolerance: bf16 probabilities feed the PV matmul (8 mantissa bits) and the output is bf16.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_has_no_leakage(backend):
    layout = flare_row([21, 11], block_size=4)
    assert_no_leakage(backend, layout, layout, [5, 32 + 6, 32 + 25])


@jax.jit
def _schedule(layout: TokenLayout):
    q = tiles.pad_layout(layout, 256, tiles.PAD_QUERY_SEGMENT)
    kv = tiles.pad_layout(layout, 256, EMPTY_SEGMENT)
    maybe, full = tiles.tile_visibility(q, kv, 16, 32)
    return maybe, full, tiles.tile_lists(maybe, full), dense_mask(q, kv)


def test_tile_visibility_is_conservative_and_tight():
    # row 0: long document (fast-path tiles); row 1: four short documents straddling tiles
    layout = stack_rows(flare_row([100, 28], block_size=8), flare_row([30, 41, 19, 38], block_size=8))
    maybe, full, (lists, partial, counts), dense = jax.tree.map(np.asarray, _schedule(layout))
    dense = dense.reshape(2, 16, 16, 8, 32)
    assert np.all(maybe >= dense.any(axis=(2, 4)))  # never skips a tile holding a visible pair
    assert np.all(full <= dense.all(axis=(2, 4)))  # never drops the mask of a partial tile
    assert maybe[0].mean() < 0.5 and full[0].sum() >= 0.25 * maybe[0].sum()
    # tiles mixing the end of one document and the start of the next are not taken as visible
    # from the first document's early queries: on this row the schedule is exact
    np.testing.assert_array_equal(maybe[1], dense[1].any(axis=(1, 3)))
    for b in range(2):
        for i in range(maybe.shape[1]):
            listed = lists[b, i, : counts[b, i]]
            np.testing.assert_array_equal(listed, np.flatnonzero(maybe[b, i]))
            np.testing.assert_array_equal(partial[b, i, : counts[b, i]], ~full[b, i, listed])


def test_rule_mask_helper_agrees_with_mask_module():
    layout = flare_row([5, 6])
    np.testing.assert_array_equal(rule_mask(layout, layout), dense_mask(layout, layout)[0])


def test_gpu_kernels_lower_with_their_tilings():
    """Each GPU kernel is lowered for CUDA with its own tiling: grid from its tiles, warps and
    stages as given (T = 256, 4 heads over 2 kv heads, D 256, bf16)."""
    layout = flare_row([128], block_size=32)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(0, 256, 256, hq=4, hkv=2, d=256))
    fwd, dq, dkv = gpu.Tiling(128, 64, 8, 3), gpu.Tiling(64, 64, 4, 2), gpu.Tiling(128, 64, 2, 1, 2)

    def attention(q, k, v):
        out, lse = gpu.forward(q, k, v, layout, layout, scale=0.1, tiling=fwd)
        return gpu.backward(q, k, v, layout, layout, out, lse, out, scale=0.1, dq_tiling=dq,
                            dkv_tiling=dkv)

    text = jax.jit(attention).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    # grids (rows side by side, tiles, row groups): fwd 256/128 query tiles and dq 256/64 for 4
    # heads one after another; dkv 256/64 key tiles with its 2 kv heads side by side
    for grid, warps, stages in (((1, 2, 4), 8, 3), ((1, 4, 4), 4, 2), ((2, 4, 1), 2, 1)):
        x, y, z = grid
        assert text.count(f"grid_x = {x} : i32, grid_y = {y} : i32, grid_z = {z} : i32") == 1
        assert text.count(f"num_stages = {stages} : i32, num_warps = {warps} : i32") == 1, (
            grid, warps, stages)
