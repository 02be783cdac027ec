"""Pallas GPU (Triton lowering) kernel for the chunk tensors' cotangents of the scan's backward.

What ``reference.chunk_cotangents`` computes in XLA, one program per chunk on grid ``(N, NT)``
(N = batch * value heads), from the state entering the chunk ``h`` and the reverse scan's ``du``
and ``dh_next`` (the cotangent of the state leaving it)::

    u = u0 - w h;   dqg = do h^T;   dp = do u^T;   dw = -du h^T;   du0 = du
    dkd = u dh_next^T;   dgam = sum(h * dh_next)

A second stream that only reads the states (the FLARE handoff's noisy blocks: own ``w``, ``u0``,
``do``, ``du``, no ``dh_next``, so zero ``kd`` and ``gam`` cotangents) runs in the same program,
so that the states are read once for both. Matmul operands are in the chunk tensors' dtype
(bf16 on the fast path) with fp32 accumulation; ``dgam`` is an fp32 sum of the products of ``h``
and ``dh_next`` as they are stored (the scans store both in the compute dtype on the fast path,
fp32 in fp32). The outputs are written in the chunk tensors' dtype in the layout the preparation
backward reads (``reference.flat_chunks``); ``du0`` is ``du`` itself.

Each program walks the ``[Dk, Dv]`` state (and ``dh_next``) in blocks of ``BLOCK_V`` value
columns; head dims above ``MAX_HEAD_DIM`` keep the XLA path (``reference.chunk_cotangents``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta import reference
from pallas_kernels.gated_delta.gpu import ScanOperands, check_shapes
from pallas_kernels.gated_delta.gpu_prep import dot
from pallas_kernels.gated_delta.reference import F32, ChunkTensors, flat_chunks

MAX_HEAD_DIM = 128  # Dk and Dv of the kernel path
NUM_WARPS = 8
# Value columns of the state a program holds at a time. H200, 4 x 4096 x 16 x 128, chunk 32, both
# FLARE streams, alone: 128 (the whole state) at 8 warps 1.056 ms, 64 at 8 warps 1.494, 64 at 4
# warps 11.8, 32 at 4 warps 2.6 (XLA: 1.470); in the train step 1.44 ms per call at 128, 1.5 at
# 64 (docs/performance.md, "Batch 4").
BLOCK_V = 128

_STREAM_INPUTS = 4  # w, u0, do, du
_STREAM_OUTPUTS = 4  # qg, p, w, kd


def _kernel(*refs, has_dh: bool, streams: int, block_v: int):
    """Inputs: ``h`` [+ ``dh_next``], then ``w, u0, do, du`` per stream; outputs ``qg, p, w, kd``
    per stream [+ ``gam`` of the first]. The products that contract the state's value
    axis (``do h^T``, ``du h^T``, ``do u^T``, ``u dh^T``) are summed over its column blocks in
    fp32 accumulators."""
    h_ref, refs = refs[0], refs[1:]
    dh_ref, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    ins, outs = refs[: _STREAM_INPUTS * streams], refs[_STREAM_INPUTS * streams :]
    ins = [ins[_STREAM_INPUTS * s : _STREAM_INPUTS * (s + 1)] for s in range(streams)]
    outs, gam_out = [outs[_STREAM_OUTPUTS * s : _STREAM_OUTPUTS * (s + 1)] for s in range(streams)], outs[-1]
    dt = ins[0][0].dtype
    w = [stream[0][...] for stream in ins]
    chunk, dk = w[0].shape
    dv = h_ref.shape[1]
    zeros = jnp.zeros((chunk, dk), F32)
    # per stream: dqg, dp, dw [, dkd of the first]
    acc = [[zeros, jnp.zeros((chunk, chunk), F32), zeros] for _ in range(streams)]
    dkd, dgam = zeros, jnp.zeros((), F32)
    for j in range(dv // block_v):
        cols = pl.ds(j * block_v, block_v)
        h = h_ref[:, cols]
        h_c = h.astype(dt)
        if has_dh:
            dh = dh_ref[:, cols]
            dgam = dgam + jnp.sum(h.astype(F32) * dh.astype(F32))
        for s, (_, u0, do, du) in enumerate(ins):
            u_c = (u0[:, cols].astype(F32) - dot(w[s], h_c)).astype(dt)
            do_c, du_c = do[:, cols].astype(dt), du[:, cols].astype(dt)
            acc[s][0] = acc[s][0] + dot(do_c, h_c, tb=True)
            acc[s][1] = acc[s][1] + dot(do_c, u_c, tb=True)
            acc[s][2] = acc[s][2] - dot(du_c, h_c, tb=True)
            if has_dh and s == 0:
                dkd = dkd + dot(u_c, dh.astype(dt), tb=True)
    for s, (dqg, dp, dw, dkd_out) in enumerate(outs):
        dqg[...], dp[...], dw[...] = (x.astype(dt) for x in acc[s])
        dkd_out[...] = (dkd if has_dh and s == 0 else zeros).astype(dt)
    if has_dh:
        gam_out[...] = dgam


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
    block_v: int = BLOCK_V,
) -> tuple[ChunkTensors, ChunkTensors | None]:
    """Cotangents of the chunk tensors ``ops`` stand for (``w``, ``u0`` read; ``gam`` for its
    shape) from the states entering each chunk ``h [N, NT, Dk, Dv]`` (fp32 or the compute
    dtype), the output cotangent ``do`` and the reverse scan's ``du`` ``[N, NT, L, Dv]`` and
    ``dh_next`` (None: zero ``kd`` and ``gam`` cotangents), and those of a ``noisy`` stream
    reading the same states (its ``do_noisy``, ``du_noisy``; no ``dh_next``). Returns
    ``ChunkTensors`` of flat ``[N, T, width]`` arrays in ``ops.w``'s dtype
    (``reference.flat_chunks`` of the chunk layout) and ``gam [N, NT]`` fp32, per stream (None
    without ``noisy``)."""
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
    widths = (dk, chunk, dk, dk)
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
        functools.partial(_kernel, has_dh=dh_next is not None, streams=len(streams),
                          block_v=min(block_v, dv)),
        out_shape=out_shape,
        grid=(n, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_delta_chunk_cotangents",
    )(*args)

    def tensors(stream: int, s_du: jax.Array, dgam: jax.Array) -> ChunkTensors:
        qg, p, w, kd = outs[_STREAM_OUTPUTS * stream : _STREAM_OUTPUTS * (stream + 1)]
        return ChunkTensors(qg, p, w, flat_chunks(s_du).astype(dt), kd, dgam)

    d = tensors(0, du, outs[-1] if dh_next is not None else jnp.zeros_like(ops.gam))
    return d, None if noisy is None else tensors(1, du_noisy, jnp.zeros_like(noisy.gam))
