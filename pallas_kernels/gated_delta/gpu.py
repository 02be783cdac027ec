"""Pallas GPU (Triton lowering) kernels for the sequential inter-chunk scan of the chunked form.

Grid ``(N, Dv / block_v)`` (N = batch * heads): each program owns a ``[Dk, block_v]`` column block
of one head's fp32 state and walks all chunks in a ``fori_loop`` (forward: first to last; backward:
last to first). The state column blocks are independent, so nothing crosses programs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta._steps import F32, bwd_step, fwd_step
from pallas_kernels.gated_delta.reference import ChunkTensors

_NUM_SMS_HINT = 132  # enough programs to fill an H100; smaller value blocks otherwise


def _block_v(n: int, dv: int) -> int:
    """Widest value block (<= 64) that still gives one program per SM: on the H100 (8 x 4096 x
    16 x 128) 64 columns x 256 programs scanned in 0.74 ms, 32 x 512 in 1.07, 16 x 1024 in 1.92
    (the narrower blocks re-read the shared ``[L, Dk]`` operands once per block)."""
    bv = min(dv, 64)
    while bv > 16 and n * (dv // bv) < _NUM_SMS_HINT:
        bv //= 2
    return bv


def check_shapes(chunk: int, dk: int, dv: int, interpret: bool) -> None:
    """Triton tiles need power-of-two sizes and dots need at least 16 along every side."""
    if interpret:
        return
    for name, size in (("chunk", chunk), ("d_k", dk), ("d_v", dv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"GPU gated-delta kernels need {name} a power of two >= 16: {size}")


class Tiling(NamedTuple):
    """Launch parameters of the scan kernels (the benchmark sweeps them)."""

    block_v: int | None = None  # None: ``_block_v``'s choice
    num_warps: int = 4
    num_stages: int = 2

    def width(self, n: int, dv: int) -> int:
        return _block_v(n, dv) if self.block_v is None else min(self.block_v, dv)

    def params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


DEFAULT_TILING = Tiling()
# Backward at 64 columns (8 x 4096 x 16 x 128, H100): 8 warps 1.00 ms, 32 columns x 4 warps 1.36.
BWD_TILING = Tiling(num_warps=8)


def _full_spec(rows: int, width: int, blocked: bool = False) -> pl.BlockSpec:
    """``[N, rows, width]`` array: a program sees all rows of its head (and its value block)."""
    return pl.BlockSpec((None, rows, width), lambda n, j: (n, 0, j if blocked else 0))


def _fwd_kernel(qg, p, w, u0, kd, gam, s0, o, s_final, *h, chunk: int, num_chunks: int):
    dk = qg.shape[-1]

    def body(i, s):
        rows = pl.ds(i * chunk, chunk)
        if h:
            h[0][pl.ds(i * dk, dk), :] = s
        o_i, s = fwd_step(qg[rows, :], p[rows, :], w[rows, :], u0[rows, :], kd[rows, :], gam[i], s)
        o[rows, :] = o_i.astype(o.dtype)
        return s

    s_final[...] = jax.lax.fori_loop(0, num_chunks, body, s0[...].astype(F32))


def _bwd_kernel(qg, p, w, kd, gam, do, ds_final, *rest, chunk: int, num_chunks: int):
    dh, (du, dhn, ds0) = (rest[0] if len(rest) == 4 else None), rest[-3:]
    dk = qg.shape[-1]

    def body(r, d):
        i = num_chunks - 1 - r
        rows, states = pl.ds(i * chunk, chunk), pl.ds(i * dk, dk)
        dhn[states, :] = d
        dh_i = None if dh is None else dh[states, :]
        du_i, d = bwd_step(qg[rows, :], p[rows, :], w[rows, :], kd[rows, :], gam[i], do[rows, :], d, dh_i)
        du[rows, :] = du_i
        return d

    ds0[...] = jax.lax.fori_loop(0, num_chunks, body, ds_final[...].astype(F32))


def _flat(x: jax.Array) -> jax.Array:
    """``[N, NT, R, C]`` -> ``[N, NT * R, C]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def scan_fwd(
    ct: ChunkTensors,
    s0: jax.Array,
    *,
    write_states: bool,
    interpret: bool = False,
    tiling: Tiling = DEFAULT_TILING,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Forward scan. Returns ``o [N, NT, L, Dv]`` (u0's dtype), states entering each chunk
    ``[N, NT, Dk, Dv]`` fp32 (None unless ``write_states``) and the final state ``[N, Dk, Dv]``."""
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    check_shapes(chunk, dk, dv, interpret)
    t = nt * chunk
    bv = tiling.width(n, dv)
    out_shape = [
        jax.ShapeDtypeStruct((n, t, dv), ct.u0.dtype),
        jax.ShapeDtypeStruct((n, dk, dv), F32),
    ]
    out_specs = [_full_spec(t, bv, True), _full_spec(dk, bv, True)]
    if write_states:
        out_shape.append(jax.ShapeDtypeStruct((n, nt * dk, dv), F32))
        out_specs.append(_full_spec(nt * dk, bv, True))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, num_chunks=nt),
        out_shape=out_shape,
        grid=(n, dv // bv),
        in_specs=[
            _full_spec(t, dk),
            _full_spec(t, chunk),
            _full_spec(t, dk),
            _full_spec(t, bv, True),
            _full_spec(t, dk),
            pl.BlockSpec((None, nt), lambda i, j: (i, 0)),
            _full_spec(dk, bv, True),
        ],
        out_specs=out_specs,
        compiler_params=tiling.params(),
        interpret=interpret,
        name="gated_delta_scan_fwd",
    )(_flat(ct.qg), _flat(ct.p), _flat(ct.w), _flat(ct.u0), _flat(ct.kd), ct.gam, s0)
    o, s_final = outs[0].reshape(n, nt, chunk, dv), outs[1]
    h = outs[2].reshape(n, nt, dk, dv) if write_states else None
    return o, h, s_final


def scan_bwd(
    ct: ChunkTensors,
    do: jax.Array,
    ds_final: jax.Array,
    dh: jax.Array | None,
    *,
    interpret: bool = False,
    tiling: Tiling = BWD_TILING,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reverse scan. ``do [N, NT, L, Dv]``, ``ds_final [N, Dk, Dv]``, ``dh`` (cotangent of the
    forward's states, or None). Returns ``du [N, NT, L, Dv]``, the cotangent of the state leaving
    each chunk ``[N, NT, Dk, Dv]`` and of the initial state ``[N, Dk, Dv]``, all fp32."""
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    t = nt * chunk
    bv = tiling.width(n, dv)
    in_specs = [
        _full_spec(t, dk),
        _full_spec(t, chunk),
        _full_spec(t, dk),
        _full_spec(t, dk),
        pl.BlockSpec((None, nt), lambda i, j: (i, 0)),
        _full_spec(t, bv, True),
        _full_spec(dk, bv, True),
    ]
    args = [_flat(ct.qg), _flat(ct.p), _flat(ct.w), _flat(ct.kd), ct.gam, _flat(do), ds_final]
    if dh is not None:
        in_specs.append(_full_spec(nt * dk, bv, True))
        args.append(_flat(dh.astype(F32)))
    du, dhn, ds0 = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, num_chunks=nt),
        out_shape=[
            jax.ShapeDtypeStruct((n, t, dv), F32),
            jax.ShapeDtypeStruct((n, nt * dk, dv), F32),
            jax.ShapeDtypeStruct((n, dk, dv), F32),
        ],
        grid=(n, dv // bv),
        in_specs=in_specs,
        out_specs=[_full_spec(t, bv, True), _full_spec(nt * dk, bv, True), _full_spec(dk, bv, True)],
        compiler_params=tiling.params(),
        interpret=interpret,
        name="gated_delta_scan_bwd",
    )(*args)
    return du.reshape(n, nt, chunk, dv), dhn.reshape(n, nt, dk, dv), ds0
