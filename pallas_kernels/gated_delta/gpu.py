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

from pallas_kernels.gated_delta._steps import F32, bwd_step, check_noisy, fwd_step, out_bwd, out_step
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

    def params(self, tile_bytes: int) -> plgpu.CompilerParams:
        """Compiler parameters; fewer pipeline stages where ``num_stages`` copies of one
        chunk's tiles (``tile_bytes``) would not fit in shared memory."""
        stages = self.num_stages
        while stages > 1 and stages * tile_bytes > _SMEM_BYTES:
            stages -= 1
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=stages)


# Shared memory per program on the H100 / H200 (227 KiB) less Triton's own use. The handoff scan
# at chunk 64 (D 128, bf16, 64 columns) has 112 KiB of tiles per chunk: two stages asked for
# 232 KiB on the H200 and failed to launch; one plain stream (64 KiB) runs at two stages.
_SMEM_BYTES = 211 * 1024


def _tile_bytes(chunk: int, widths: list[int], itemsize: int) -> int:
    """Bytes of one chunk's ``[chunk, width]`` tiles."""
    return chunk * sum(widths) * itemsize


DEFAULT_TILING = Tiling()
# Backward at 64 columns (8 x 4096 x 16 x 128, H100): 8 warps 1.00 ms, 32 columns x 4 warps 1.36.
BWD_TILING = Tiling(num_warps=8)


def _full_spec(rows: int, width: int, blocked: bool = False) -> pl.BlockSpec:
    """``[N, rows, width]`` array: a program sees all rows of its head (and its value block)."""
    return pl.BlockSpec((None, rows, width), lambda n, j: (n, 0, j if blocked else 0))


def _fwd_kernel(*refs, chunk: int, num_chunks: int, write_states: bool, noisy: bool):
    """Inputs ``qg, p, w, u0, kd, gam, s0`` [+ the noisy ``qg, p, w, u0``], outputs ``o, s_final``
    [+ ``h``] [+ noisy ``o``]: block ``i`` of the noisy stream reads the state entering chunk ``i``."""
    (qg, p, w, u0, kd, gam, s0), refs = refs[:7], refs[7:]
    side, (o, s_final, *outs) = (refs[:4], refs[4:]) if noisy else ((), refs)
    h, o_side = (outs[0] if write_states else None), (outs[-1] if noisy else None)
    dk = qg.shape[-1]

    def body(i, s):
        rows = pl.ds(i * chunk, chunk)
        if write_states:
            h[pl.ds(i * dk, dk), :] = s
        if noisy:
            o_n, _ = out_step(*(x[rows, :] for x in side), s.astype(w.dtype))
            o_side[rows, :] = o_n.astype(o_side.dtype)
        o_i, s = fwd_step(qg[rows, :], p[rows, :], w[rows, :], u0[rows, :], kd[rows, :], gam[i], s)
        o[rows, :] = o_i.astype(o.dtype)
        return s

    s_final[...] = jax.lax.fori_loop(0, num_chunks, body, s0[...].astype(F32))


def _bwd_kernel(*refs, chunk: int, num_chunks: int, has_dh: bool, noisy: bool):
    """Inputs ``qg, p, w, kd, gam, do, ds_final`` [+ ``dh``] [+ the noisy ``qg, p, w, do``],
    outputs ``du, dhn, ds0`` [+ noisy ``du``]."""
    (qg, p, w, kd, gam, do, ds_final), refs = refs[:7], refs[7:]
    dh, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    side, (du, dhn, ds0, *du_side) = (refs[:4], refs[4:]) if noisy else ((), refs)
    dk = qg.shape[-1]

    def body(r, d):
        i = num_chunks - 1 - r
        rows, states = pl.ds(i * chunk, chunk), pl.ds(i * dk, dk)
        dhn[states, :] = d
        dh_i = None if dh is None else dh[states, :]
        du_i, d = bwd_step(qg[rows, :], p[rows, :], w[rows, :], kd[rows, :], gam[i], do[rows, :], d, dh_i)
        du[rows, :] = du_i
        if noisy:
            du_n, ds_n = out_bwd(*(x[rows, :] for x in side))
            du_side[0][rows, :] = du_n
            d = d + ds_n
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
    noisy: ChunkTensors | None = None,
    heads: int | None = None,
    interpret: bool = False,
    tiling: Tiling = DEFAULT_TILING,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    """Forward scan. Returns ``o [N, NT, L, Dv]`` (u0's dtype; with ``heads``, written straight
    into the public ``[N / heads, NT * L, heads, Dv]`` layout instead), states entering each chunk
    ``[N, NT, Dk, Dv]`` fp32 (None unless ``write_states``), the final state ``[N, Dk, Dv]`` and
    the output of the ``noisy`` stream (None without it): a second set of chunk tensors, same
    layout, whose chunk ``i`` reads the state entering chunk ``i`` and never updates it (the
    FLARE handoff with one chunk per noisy block)."""
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    check_shapes(chunk, dk, dv, interpret)
    t = nt * chunk
    bv = tiling.width(n, dv)
    if heads is None:
        o_shape, o_spec = (n, t, dv), _full_spec(t, bv, True)
    else:  # program n writes column block j of head n % heads of batch row n // heads
        o_shape = (n // heads, t, heads, dv)
        o_spec = pl.BlockSpec((None, t, None, bv), lambda i, j: (i // heads, 0, i % heads, j))
    out_shape = [jax.ShapeDtypeStruct(o_shape, ct.u0.dtype), jax.ShapeDtypeStruct((n, dk, dv), F32)]
    out_specs = [o_spec, _full_spec(dk, bv, True)]
    if write_states:
        out_shape.append(jax.ShapeDtypeStruct((n, nt * dk, dv), F32))
        out_specs.append(_full_spec(nt * dk, bv, True))
    in_specs = [_full_spec(t, dk), _full_spec(t, chunk), _full_spec(t, dk), _full_spec(t, bv, True)]
    args = [_flat(x) for x in ct[:5]] + [ct.gam, s0]
    in_specs += [_full_spec(t, dk), pl.BlockSpec((None, nt), lambda i, j: (i, 0)), _full_spec(dk, bv, True)]
    if noisy is not None:
        check_noisy(ct, noisy)
        in_specs += in_specs[:4]
        args += [_flat(x) for x in noisy[:4]]
        out_shape.append(jax.ShapeDtypeStruct(o_shape, noisy.u0.dtype))
        out_specs.append(o_spec)
    widths = [dk, chunk, dk, bv, dk] + ([] if noisy is None else [dk, chunk, dk, bv])
    outs = pl.pallas_call(
        functools.partial(
            _fwd_kernel, chunk=chunk, num_chunks=nt, write_states=write_states, noisy=noisy is not None
        ),
        out_shape=out_shape,
        grid=(n, dv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=tiling.params(_tile_bytes(chunk, widths, ct.qg.dtype.itemsize)),
        interpret=interpret,
        name="gated_delta_scan_fwd",
    )(*args)

    def shaped(o: jax.Array) -> jax.Array:
        return o.reshape(n, nt, chunk, dv) if heads is None else o

    h = outs[2].reshape(n, nt, dk, dv) if write_states else None
    return shaped(outs[0]), h, outs[1], (shaped(outs[-1]) if noisy is not None else None)


def scan_bwd(
    ct: ChunkTensors,
    do: jax.Array,
    ds_final: jax.Array,
    dh: jax.Array | None,
    *,
    noisy: ChunkTensors | None = None,
    do_noisy: jax.Array | None = None,
    interpret: bool = False,
    tiling: Tiling = BWD_TILING,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Reverse scan. ``do [N, NT, L, Dv]``, ``ds_final [N, Dk, Dv]``, ``dh`` (cotangent of the
    forward's states, or None), the ``noisy`` stream's tensors and output cotangent (or None).
    Returns ``du [N, NT, L, Dv]``, the cotangent of the state leaving each chunk
    ``[N, NT, Dk, Dv]``, of the initial state ``[N, Dk, Dv]`` and the noisy ``du`` (or None),
    all fp32."""
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
    out_shape = [
        jax.ShapeDtypeStruct((n, t, dv), F32),
        jax.ShapeDtypeStruct((n, nt * dk, dv), F32),
        jax.ShapeDtypeStruct((n, dk, dv), F32),
    ]
    out_specs = [_full_spec(t, bv, True), _full_spec(nt * dk, bv, True), _full_spec(dk, bv, True)]
    if dh is not None:
        in_specs.append(_full_spec(nt * dk, bv, True))
        args.append(_flat(dh.astype(F32)))
    if noisy is not None:
        check_noisy(ct, noisy)
        in_specs += [*in_specs[:3], _full_spec(t, bv, True)]
        args += [*(_flat(x) for x in noisy[:3]), _flat(do_noisy)]
        out_shape.append(out_shape[0])
        out_specs.append(out_specs[0])
    widths = [dk, chunk, dk, dk, bv] + ([] if noisy is None else [dk, chunk, dk, bv])
    tile_bytes = _tile_bytes(chunk, widths, ct.qg.dtype.itemsize) + (0 if dh is None else dk * bv * 4)
    outs = pl.pallas_call(
        functools.partial(
            _bwd_kernel, chunk=chunk, num_chunks=nt, has_dh=dh is not None, noisy=noisy is not None
        ),
        out_shape=out_shape,
        grid=(n, dv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=tiling.params(tile_bytes),
        interpret=interpret,
        name="gated_delta_scan_bwd",
    )(*args)
    du, dhn, ds0 = outs[0].reshape(n, nt, chunk, dv), outs[1].reshape(n, nt, dk, dv), outs[2]
    return du, dhn, ds0, (outs[3].reshape(n, nt, chunk, dv) if noisy is not None else None)
