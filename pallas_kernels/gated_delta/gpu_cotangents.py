"""Pallas GPU (Triton lowering) kernel for the chunk tensors' cotangents of the scan's backward.

What ``reference.chunk_cotangents`` computes in XLA, one program per chunk on grid ``(N, NT)``
(N = batch * value heads), from the state entering the chunk ``h`` and the reverse scan's ``du``
and ``dh_next`` (the cotangent of the state leaving it)::

    u = u0 - w h;   dqg = do h^T;   dp = do u^T;   dw = -du h^T;   du0 = du
    dkd = u dh_next^T;   dgam = sum(h * dh_next)

A second stream that only reads the states (the FLARE handoff's noisy blocks: own ``w``, ``u0``,
``do``, ``du``, no ``dh_next``, so zero ``kd`` and ``gam`` cotangents) runs in the same program,
so that the fp32 states are read once for both. Matmul operands are in the chunk tensors' dtype
(bf16 on the fast path) with fp32 accumulation; ``dgam`` is fp32 from the fp32 ``h`` and
``dh_next``. The outputs are written in the chunk tensors' dtype in the layout the preparation
backward reads (``reference.flat_chunks``), ``du0`` included (``du`` cast once, as it is read).

Each program holds a whole ``[Dk, Dv]`` fp32 state (and ``dh_next``): head dims above
``MAX_HEAD_DIM`` would not fit in registers, and keep the XLA path (``reference.chunk_cotangents``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta import reference
from pallas_kernels.gated_delta.gpu import ScanOperands, check_shapes
from pallas_kernels.gated_delta.gpu_prep import _dot
from pallas_kernels.gated_delta.reference import F32, ChunkTensors, flat_chunks

MAX_HEAD_DIM = 128  # Dk and Dv of the kernel path: one [128, 128] fp32 state per program
NUM_WARPS = 8  # a [128, 128] fp32 tile is 64 registers per thread at 8 warps

_STREAM_INPUTS = 4  # w, u0, do, du
_STREAM_OUTPUTS = 5  # qg, p, w, u0, kd


def _stream(w, u0, do, du, h_c: jax.Array, dh_c: jax.Array | None, outs) -> None:
    """One stream's cotangents of one chunk from the state ``h_c`` (and ``dh_c``: the cotangent
    of the state leaving the chunk, or None), both already in the chunk tensors' dtype."""
    dqg, dp, dw, du0, dkd = outs
    dt = w.dtype
    u_c = (u0[...].astype(F32) - _dot(w[...], h_c)).astype(dt)
    do_c, du_f = do[...].astype(dt), du[...]
    du_c = du_f.astype(dt)
    dqg[...] = _dot(do_c, h_c, tb=True).astype(dt)
    dp[...] = _dot(do_c, u_c, tb=True).astype(dt)
    dw[...] = (-_dot(du_c, h_c, tb=True)).astype(dt)
    du0[...] = du_c
    dkd[...] = jnp.zeros(dkd.shape, dt) if dh_c is None else _dot(u_c, dh_c, tb=True).astype(dt)


def _kernel(*refs, has_dh: bool, streams: int):
    """Inputs: ``h`` [+ ``dh_next``], then ``w, u0, do, du`` per stream; outputs ``qg, p, w, u0,
    kd`` per stream [+ ``gam`` of the first]."""
    h_ref, refs = refs[0], refs[1:]
    dh_ref, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    ins, outs = refs[: _STREAM_INPUTS * streams], refs[_STREAM_INPUTS * streams :]
    h = h_ref[...]
    h_c = h.astype(ins[0].dtype)
    dh_c = None
    if has_dh:
        dh = dh_ref[...]
        outs[-1][...] = jnp.sum(h * dh)
        dh_c = dh.astype(h_c.dtype)
    for s in range(streams):
        stream_ins = ins[_STREAM_INPUTS * s : _STREAM_INPUTS * (s + 1)]
        stream_outs = outs[_STREAM_OUTPUTS * s : _STREAM_OUTPUTS * (s + 1)]
        _stream(*stream_ins, h_c, dh_c if s == 0 else None, stream_outs)


def xla_chunk_cotangents(
    ops: ScanOperands, h: jax.Array, do: jax.Array, du: jax.Array, dh_next: jax.Array | None
) -> ChunkTensors:
    """One stream's ``reference.chunk_cotangents`` (XLA) in the kernel's output layout and dtypes."""
    d = reference.chunk_cotangents(ops, h, do, du, dh_next)
    return ChunkTensors(*(flat_chunks(x).astype(ops.w.dtype) for x in d[:5]), d.gam)


def chunk_cotangents(
    ops: ScanOperands,
    h: jax.Array,
    do: jax.Array,
    du: jax.Array,
    dh_next: jax.Array | None,
    *,
    noisy: ScanOperands | None = None,
    do_noisy: jax.Array | None = None,
    du_noisy: jax.Array | None = None,
    interpret: bool = False,
    num_warps: int = NUM_WARPS,
) -> tuple[ChunkTensors, ChunkTensors | None]:
    """Cotangents of the chunk tensors ``ops`` stand for (``w``, ``u0`` read; ``gam`` for its
    shape) from the states entering each chunk ``h [N, NT, Dk, Dv]`` fp32, the output cotangent
    ``do`` and the reverse scan's ``du`` ``[N, NT, L, Dv]`` and ``dh_next`` (None: zero ``kd``
    and ``gam`` cotangents), and those of a ``noisy`` stream reading the same states (its
    ``do_noisy``, ``du_noisy``; no ``dh_next``). Returns ``ChunkTensors`` of flat
    ``[N, T, width]`` arrays in ``ops.w``'s dtype (``reference.flat_chunks`` of the chunk layout)
    and ``gam [N, NT]`` fp32, per stream (None without ``noisy``)."""
    n, nt, chunk, dk = ops.w.shape
    dv = ops.u0.shape[-1]
    if max(dk, dv) > MAX_HEAD_DIM:
        side = None if noisy is None else xla_chunk_cotangents(noisy, h, do_noisy, du_noisy, None)
        return xla_chunk_cotangents(ops, h, do, du, dh_next), side
    check_shapes(chunk, dk, dv, interpret)
    t, dt = nt * chunk, ops.w.dtype

    def rows(width: int) -> pl.BlockSpec:
        return pl.BlockSpec((None, chunk, width), lambda i, j: (i, j, 0))

    states = pl.BlockSpec((None, dk, dv), lambda i, j: (i, j, 0))
    streams = [(ops, do, du)] + ([] if noisy is None else [(noisy, do_noisy, du_noisy)])
    args, in_specs = [flat_chunks(h)], [states]
    if dh_next is not None:
        args.append(flat_chunks(dh_next))
        in_specs.append(states)
    widths = (dk, chunk, dk, dv, dk)
    out_shape, out_specs = [], []
    for s_ops, s_do, s_du in streams:
        args += [flat_chunks(x) for x in (s_ops.w, s_ops.u0, s_do, s_du)]
        in_specs += [rows(dk), rows(dv), rows(dv), rows(dv)]
        out_shape += [jax.ShapeDtypeStruct((n, t, wd), dt) for wd in widths]
        out_specs += [rows(wd) for wd in widths]
    if dh_next is not None:
        out_shape.append(jax.ShapeDtypeStruct((n, nt), F32))
        out_specs.append(pl.BlockSpec((None, None), lambda i, j: (i, j)))
    outs = pl.pallas_call(
        functools.partial(_kernel, has_dh=dh_next is not None, streams=len(streams)),
        out_shape=out_shape,
        grid=(n, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_delta_chunk_cotangents",
    )(*args)
    dgam = outs[-1] if dh_next is not None else jnp.zeros_like(ops.gam)
    d = ChunkTensors(*outs[:_STREAM_OUTPUTS], dgam)
    if noisy is None:
        return d, None
    side = ChunkTensors(*outs[_STREAM_OUTPUTS : 2 * _STREAM_OUTPUTS], jnp.zeros_like(noisy.gam))
    return d, side
