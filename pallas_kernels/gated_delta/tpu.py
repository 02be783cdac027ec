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

from pallas_kernels.gated_delta._steps import F32, bwd_step, check_noisy, fwd_step, out_bwd, out_step
from pallas_kernels.gated_delta.reference import ChunkTensors, public_output


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


def _fwd_kernel(*refs, num_chunks: int, write_states: bool, noisy: bool):
    """Refs as in ``gpu._fwd_kernel`` (one chunk each), then the state scratch."""
    (qg, p, w, u0, kd, gam, s0), refs = refs[:7], refs[7:]
    side, (o, s_final, *outs, s) = (refs[:4], refs[4:]) if noisy else ((), refs)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s[...] = s0[...].astype(F32)

    if write_states:
        outs[0][...] = s[...]
    if noisy:
        o_n, _ = out_step(*(x[...] for x in side), s[...].astype(w.dtype))
        outs[-1][...] = o_n.astype(outs[-1].dtype)
    o_i, s_next = fwd_step(qg[...], p[...], w[...], u0[...], kd[...], gam[...], s[...])
    o[...] = o_i.astype(o.dtype)
    s[...] = s_next

    @pl.when(i == num_chunks - 1)
    def _():
        s_final[...] = s_next


def _bwd_kernel(*refs, num_chunks: int, has_dh: bool, noisy: bool):
    """Refs as in ``gpu._bwd_kernel`` (one chunk each), then the cotangent scratch."""
    (qg, p, w, kd, gam, do, ds_final), refs = refs[:7], refs[7:]
    dh, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    side, (du, dhn, ds0, *du_side, d) = (refs[:4], refs[4:]) if noisy else ((), refs)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        d[...] = ds_final[...].astype(F32)

    dhn[...] = d[...]
    dh_i = None if dh is None else dh[...]
    du_i, d_prev = bwd_step(qg[...], p[...], w[...], kd[...], gam[...], do[...], d[...], dh_i)
    du[...] = du_i
    if noisy:
        du_n, ds_n = out_bwd(*(x[...] for x in side))
        du_side[0][...] = du_n
        d_prev = d_prev + ds_n
    d[...] = d_prev

    @pl.when(i == num_chunks - 1)
    def _():
        ds0[...] = d_prev


def scan_fwd(
    ct: ChunkTensors,
    s0: jax.Array,
    *,
    write_states: bool,
    noisy: ChunkTensors | None = None,
    heads: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    """Forward scan; same contract as ``gpu.scan_fwd`` (the public layout of ``heads`` is an XLA
    transpose of the kernel's chunk-major output here)."""
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
    in_specs = [
        spec(chunk, dk, blocked=False),
        spec(chunk, chunk, blocked=False),
        spec(chunk, dk, blocked=False),
        spec(chunk, bv, blocked=True),
        spec(chunk, dk, blocked=False),
        spec(1, 1, blocked=False),
        _state_spec(dk, bv),
    ]
    args = [*ct[:5], ct.gam.reshape(n, nt, 1, 1), s0]
    if noisy is not None:
        check_noisy(ct, noisy)
        in_specs += in_specs[:4]
        args += noisy[:4]
        out_shape.append(jax.ShapeDtypeStruct(noisy.u0.shape, noisy.u0.dtype))
        out_specs.append(out_specs[0])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, num_chunks=nt, write_states=write_states, noisy=noisy is not None),
        out_shape=out_shape,
        grid=(n, dv // bv, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gated_delta_scan_fwd",
    )(*args)
    def shaped(o: jax.Array) -> jax.Array:
        return o if heads is None else public_output(o, heads)

    o_noisy = shaped(outs[-1]) if noisy is not None else None
    return shaped(outs[0]), (outs[2] if write_states else None), outs[1], o_noisy


def scan_bwd(
    ct: ChunkTensors,
    do: jax.Array,
    ds_final: jax.Array,
    dh: jax.Array | None,
    *,
    noisy: ChunkTensors | None = None,
    do_noisy: jax.Array | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
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
    out_shape = [
        jax.ShapeDtypeStruct((n, nt, chunk, dv), F32),
        jax.ShapeDtypeStruct((n, nt, dk, dv), F32),
        jax.ShapeDtypeStruct((n, dk, dv), F32),
    ]
    out_specs = [spec(chunk, bv, blocked=True), spec(dk, bv, blocked=True), _state_spec(dk, bv)]
    if dh is not None:
        in_specs.append(spec(dk, bv, blocked=True))
        args.append(dh.astype(F32))
    if noisy is not None:
        check_noisy(ct, noisy)
        in_specs += [*in_specs[:3], spec(chunk, bv, blocked=True)]
        args += [*noisy[:3], do_noisy]
        out_shape.append(out_shape[0])
        out_specs.append(out_specs[0])
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, num_chunks=nt, has_dh=dh is not None, noisy=noisy is not None),
        out_shape=out_shape,
        grid=(n, dv // bv, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, bv), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gated_delta_scan_bwd",
    )(*args)
    return (*outs[:3], outs[3] if noisy is not None else None)
