"""Pallas GPU (Triton lowering) kernels of the RMSNorm, forward and backward.

The rows ``[R, D]`` (``D`` a power of two: the whole row is one tile wide) are cut into tiles of
``block_rows`` rows. The forward writes the normed rows and each row's ``rstd = 1 / rms`` (fp32,
the backward's residual). The backward walks ``tiles_per_program`` tiles per program: it reads
``x``, ``dy`` (and the gate) once and writes ``dx`` (and ``d_gate``), and sums the weight
gradient of its rows in an fp32 ``[D]`` accumulator, written once per program (XLA adds the
programs' partial sums). XLA instead runs the normalisation's row reduction and the weight
gradient's column reduction as separate passes over the same rows.

With ``n = x rstd`` and ``s = scale (= 1 + w or w) [* silu(gate)]``: ``y = n s``,
``dx = rstd (dn - n mean(dn n))`` with ``dn = dy s``, ``dw = sum_rows dy n [silu(gate)]``. The
gated form rounds ``n`` to the input dtype before the gate (as :mod:`.reference`), and its
gradient passes that rounding straight through, as autodiff does.
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
    """Launch parameters: elements per tile (``block_rows = tile_elements / D``, a power of two
    that divides the rows), tiles per backward program and Triton's warps."""

    tile_elements: int = 8192
    tiles_per_program: int = 8
    num_warps: int = 4


def _dividing_power_of_two(n: int, want: int) -> int:
    """The largest power of two ``<= max(want, 1)`` that divides ``n``."""
    block = 1
    while block * 2 <= want and n % (block * 2) == 0:
        block *= 2
    return block


def _geometry(rows: int, width: int, tiling: Tiling) -> tuple[int, int]:
    """``(block_rows, tiles_per_program)`` for ``rows`` rows of ``width``."""
    block_rows = _dividing_power_of_two(rows, tiling.tile_elements // width)
    return block_rows, _dividing_power_of_two(rows // block_rows, tiling.tiles_per_program)


def _scale(w_ref, unit_offset: bool) -> jax.Array:
    w = w_ref[...].astype(F32)
    return 1.0 + w if unit_offset else w


def _normed(x: jax.Array, rstd: jax.Array, dtype, gated: bool) -> tuple[jax.Array, jax.Array]:
    """``(n, n as the gate multiplies it)``: the gated form rounds ``n`` to ``dtype``."""
    n = x * rstd[:, None]
    return n, (n.astype(dtype).astype(F32) if gated else n)


def _fwd_kernel(x_ref, w_ref, *refs, eps: float, unit_offset: bool, gated: bool):
    g_ref, (y_ref, rstd_ref) = (refs[0], refs[1:]) if gated else (None, refs)
    x = x_ref[...].astype(F32)
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + eps)
    _, n = _normed(x, rstd, x_ref.dtype, gated)
    y = n * _scale(w_ref, unit_offset)[None, :]
    if gated:
        y = y * jax.nn.silu(g_ref[...].astype(F32))
    y_ref[...] = y.astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _bwd_kernel(x_ref, w_ref, *refs, unit_offset: bool, gated: bool, block_rows: int,
                tiles: int):
    if gated:
        g_ref, rstd_ref, dy_ref, dx_ref, dg_ref, dw_ref = refs
    else:
        (rstd_ref, dy_ref, dx_ref, dw_ref), g_ref, dg_ref = refs, None, None
    scale = _scale(w_ref, unit_offset)[None, :]

    def body(t, dw):
        rows = pl.ds(pl.multiple_of(t * block_rows, block_rows), block_rows)
        x, dy, rstd = x_ref[rows, :].astype(F32), dy_ref[rows, :].astype(F32), rstd_ref[rows]
        n, n_scaled = _normed(x, rstd, x_ref.dtype, gated)
        if gated:
            g = g_ref[rows, :].astype(F32)
            sig = jax.nn.sigmoid(g)
            silu = g * sig
            dg = dy * scale * n_scaled * sig * (1.0 + g * (1.0 - sig))
            dg_ref[rows, :] = dg.astype(dg_ref.dtype)
            dw = dw + jnp.sum(dy * n_scaled * silu, axis=0)
            dn = dy * scale * silu
        else:
            dw = dw + jnp.sum(dy * n, axis=0)
            dn = dy * scale
        dx = rstd[:, None] * (dn - n * jnp.mean(dn * n, axis=1)[:, None])
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return dw

    dw_ref[...] = jax.lax.fori_loop(0, tiles, body, jnp.zeros((x_ref.shape[1],), F32))


def _rows_spec(block_rows: int, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((block_rows, width), lambda i: (i, 0))


def forward(x: jax.Array, weight: jax.Array, gate: jax.Array | None, *, eps: float,
            unit_offset: bool, tiling: Tiling, interpret: bool = False
            ) -> tuple[jax.Array, jax.Array]:
    """``(y [R, D] in x's dtype, rstd [R] fp32)`` of the rows ``x [R, D]``."""
    rows, width = x.shape
    block_rows, _ = _geometry(rows, width, tiling)
    spec = _rows_spec(block_rows, width)
    gated = gate is not None
    kernel = functools.partial(_fwd_kernel, eps=eps, unit_offset=unit_offset, gated=gated)
    return pl.pallas_call(
        kernel, grid=(rows // block_rows,),
        in_specs=[spec, pl.BlockSpec((width,), lambda i: (0,))] + ([spec] if gated else []),
        out_specs=[spec, pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((rows,), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps),
        interpret=interpret, name="rms_norm_fwd",
    )(x, weight, *([gate] if gated else []))


def backward(x: jax.Array, weight: jax.Array, gate: jax.Array | None, rstd: jax.Array,
             dy: jax.Array, *, unit_offset: bool, tiling: Tiling, interpret: bool = False
             ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(dx, d_gate or None, d_weight fp32 [D])`` from the forward's ``rstd`` and ``dy``."""
    rows, width = x.shape
    block_rows, tiles = _geometry(rows, width, tiling)
    programs = rows // (block_rows * tiles)
    spec = _rows_spec(block_rows * tiles, width)
    gated = gate is not None
    kernel = functools.partial(_bwd_kernel, unit_offset=unit_offset, gated=gated,
                               block_rows=block_rows, tiles=tiles)
    row_outs = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if gated:
        row_outs.append(jax.ShapeDtypeStruct(gate.shape, gate.dtype))
    outs = pl.pallas_call(
        kernel, grid=(programs,),
        in_specs=([spec, pl.BlockSpec((width,), lambda i: (0,))] + ([spec] if gated else [])
                  + [pl.BlockSpec((block_rows * tiles,), lambda i: (i,)), spec]),
        out_specs=[spec] * len(row_outs) + [pl.BlockSpec((None, width), lambda i: (i, 0))],
        out_shape=row_outs + [jax.ShapeDtypeStruct((programs, width), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps),
        interpret=interpret, name="rms_norm_bwd",
    )(x, weight, *([gate] if gated else []), rstd, dy)
    return outs[0], (outs[1] if gated else None), jnp.sum(outs[-1], axis=0)
