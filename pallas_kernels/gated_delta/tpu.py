"""Pallas TPU (Mosaic) kernels for the sequential inter-chunk scan of the chunked form.

Grid ``(N, Dv / block_v, NT)``: the chunk axis is innermost and sequential ("arbitrary"); the
``[Dk, block_v]`` fp32 state column block lives in a VMEM scratch buffer across it. The backward
walks the chunks in reverse through its index maps.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta._steps import F32, bwd_step, fwd_step
from pallas_kernels.gated_delta.reference import ChunkTensors


def _block_v(dv: int) -> int:
    return min(dv, 128)


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _chunk_spec(rows: int, width: int, nt: int, blocked: bool, reverse: bool) -> pl.BlockSpec:
    """``[N, NT, rows, width]`` array: one chunk (and value block) per grid step."""

    def index(n, j, i):
        return (n, nt - 1 - i if reverse else i, 0, j if blocked else 0)

    return pl.BlockSpec((None, None, rows, width), index)


def _state_spec(dk: int, bv: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, dk, bv), lambda n, j, i: (n, 0, j))


def _fwd_kernel(qg, p, w, u0, kd, gam, s0, o, s_final, *rest, num_chunks: int):
    *h, s = rest
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s[...] = s0[...].astype(F32)

    if h:
        h[0][...] = s[...]
    o_i, s_next = fwd_step(qg[...], p[...], w[...], u0[...], kd[...], gam[...], s[...])
    o[...] = o_i.astype(o.dtype)
    s[...] = s_next

    @pl.when(i == num_chunks - 1)
    def _():
        s_final[...] = s_next


def _bwd_kernel(qg, p, w, kd, gam, do, ds_final, *rest, num_chunks: int):
    *dh, du, dhn, ds0, d = rest
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        d[...] = ds_final[...].astype(F32)

    dhn[...] = d[...]
    dh_i = dh[0][...] if dh else None
    du_i, d_prev = bwd_step(qg[...], p[...], w[...], kd[...], gam[...], do[...], d[...], dh_i)
    du[...] = du_i
    d[...] = d_prev

    @pl.when(i == num_chunks - 1)
    def _():
        ds0[...] = d_prev


def scan_fwd(
    ct: ChunkTensors, s0: jax.Array, *, write_states: bool, interpret: bool = False
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Forward scan; same contract as ``gpu.scan_fwd``."""
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    bv = _block_v(dv)
    spec = functools.partial(_chunk_spec, nt=nt, reverse=False)
    out_shape = [
        jax.ShapeDtypeStruct((n, nt, chunk, dv), ct.u0.dtype),
        jax.ShapeDtypeStruct((n, dk, dv), F32),
    ]
    out_specs = [spec(chunk, bv, blocked=True), _state_spec(dk, bv)]
    if write_states:
        out_shape.append(jax.ShapeDtypeStruct((n, nt, dk, dv), F32))
        out_specs.append(spec(dk, bv, blocked=True))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, num_chunks=nt),
        out_shape=out_shape,
        grid=(n, dv // bv, nt),
        in_specs=[
            spec(chunk, dk, blocked=False),
            spec(chunk, chunk, blocked=False),
            spec(chunk, dk, blocked=False),
            spec(chunk, bv, blocked=True),
            spec(chunk, dk, blocked=False),
            spec(1, 1, blocked=False),
            _state_spec(dk, bv),
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gated_delta_scan_fwd",
    )(*ct[:5], ct.gam.reshape(n, nt, 1, 1), s0)
    return outs[0], (outs[2] if write_states else None), outs[1]


def scan_bwd(
    ct: ChunkTensors,
    do: jax.Array,
    ds_final: jax.Array,
    dh: jax.Array | None,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reverse scan; same contract as ``gpu.scan_bwd``."""
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    bv = _block_v(dv)
    spec = functools.partial(_chunk_spec, nt=nt, reverse=True)
    in_specs = [
        spec(chunk, dk, blocked=False),
        spec(chunk, chunk, blocked=False),
        spec(chunk, dk, blocked=False),
        spec(chunk, dk, blocked=False),
        spec(1, 1, blocked=False),
        spec(chunk, bv, blocked=True),
        _state_spec(dk, bv),
    ]
    args = [ct.qg, ct.p, ct.w, ct.kd, ct.gam.reshape(n, nt, 1, 1), do, ds_final]
    if dh is not None:
        in_specs.append(spec(dk, bv, blocked=True))
        args.append(dh.astype(F32))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, num_chunks=nt),
        out_shape=[
            jax.ShapeDtypeStruct((n, nt, chunk, dv), F32),
            jax.ShapeDtypeStruct((n, nt, dk, dv), F32),
            jax.ShapeDtypeStruct((n, dk, dv), F32),
        ],
        grid=(n, dv // bv, nt),
        in_specs=in_specs,
        out_specs=[spec(chunk, bv, blocked=True), spec(dk, bv, blocked=True), _state_spec(dk, bv)],
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gated_delta_scan_bwd",
    )(*args)
