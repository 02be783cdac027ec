"""Pallas GPU (Triton lowering) kernels for the sequential inter-chunk scan of the chunked form.

Grid ``(N, Dv / block_v)`` (N = batch * heads): each program owns a ``[Dk, block_v]`` column block
of one head's fp32 state and walks all chunks in a ``fori_loop`` (forward: first to last; backward:
last to first). The state column blocks are independent, so nothing crosses programs.

The chunk operands are :class:`ScanOperands`: ``qg`` and ``kd`` of ``reference.ChunkTensors``
stay q and k with per-token row scales, read where they are (the public layout).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta._steps import F32, bwd_step, check_noisy, fwd_step, out_bwd, out_step
from pallas_kernels.gated_delta.reference import flat_chunks

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
    num_stages: int | None = None  # None: ``_stages``'s choice

    def width(self, n: int, dv: int) -> int:
        return _block_v(n, dv) if self.block_v is None else min(self.block_v, dv)

    def params(self, tile_bytes: int, programs: int) -> plgpu.CompilerParams:
        """Compiler parameters for ``programs`` programs; fewer pipeline stages where that many
        copies of one chunk's tiles (``tile_bytes``) would not fit in shared memory."""
        stages = _stages(programs) if self.num_stages is None else self.num_stages
        while stages > 1 and stages * tile_bytes > _SMEM_BYTES:
            stages -= 1
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=stages)


def _stages(programs: int) -> int:
    """Two pipeline stages (the next chunk's tiles load during this one's dots) while every
    program has an SM of its own; one where programs outnumber SMs, so that the shared memory
    of one stage lets several programs share an SM (H200, 8 x 4096 x 16 x 128, 256 programs,
    forward scan alone: 0.375 ms at one stage, 0.414 at two)."""
    return 2 if programs <= _NUM_SMS_HINT else 1


# Shared memory per program on the H100 / H200 (227 KiB) less Triton's own use. The handoff scan
# at chunk 64 (D 128, bf16, 64 columns) has 112 KiB of tiles per chunk: two stages asked for
# 232 KiB on the H200 and failed to launch; one plain stream (64 KiB) runs at two stages.
_SMEM_BYTES = 211 * 1024


def _tile_bytes(chunk: int, widths: list[int], itemsize: int) -> int:
    """Bytes of one chunk's ``[chunk, width]`` tiles."""
    return chunk * sum(widths) * itemsize


DEFAULT_TILING = Tiling()
# Backward at 64 columns (8 x 4096 x 16 x 128, H100): 8 warps 1.00 ms, 32 columns x 4 warps 1.36.
BWD_TILING = Tiling(num_warps=8, num_stages=2)


class ScanOperands(NamedTuple):
    """The GPU scan's operands: ``reference.ChunkTensors`` with ``qg = diag(q_scale) q`` and
    ``kd = diag(k_scale) k`` left unformed (never written; the scan scales the ``[L, BV]`` side
    of their products). ``q``, ``k`` are in the public ``[B, T, Hk, Dk]`` layout: row
    ``n = b * Hv + head`` reads key head ``head // (Hv / Hk)``."""

    q: jax.Array
    q_scale: jax.Array  # [N, T] fp32, scale c exp(G)
    p: jax.Array  # [N, NT, L, L]
    w: jax.Array  # [N, NT, L, Dk]
    u0: jax.Array  # [N, NT, L, Dv]
    k: jax.Array
    k_scale: jax.Array  # [N, T] fp32, D[L - 1, :]
    gam: jax.Array  # [N, NT] fp32


def _rows_spec(x: jax.Array, n: int) -> pl.BlockSpec:
    """q / k ``[B, T, Hk, D]``: program ``i`` sees all rows of its key head."""
    b, t, hk, d = x.shape
    hv = n // b
    rep = hv // hk
    return pl.BlockSpec((None, t, None, d), lambda i, j: (i // hv, 0, (i % hv) // rep, 0))


def _scale_spec(t: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, t), lambda i, j: (i, 0))


def _full_spec(rows: int, width: int, blocked: bool = False) -> pl.BlockSpec:
    """``[N, rows, width]`` array: a program sees all rows of its head (and its value block)."""
    return pl.BlockSpec((None, rows, width), lambda n, j: (n, 0, j if blocked else 0))


# The operands each kernel reads, in order: the forward reads all of a stream's; a second stream
# that only reads the state (the FLARE handoff's noisy blocks) reads its output half.
_FWD = ("q", "q_scale", "p", "w", "u0", "k", "k_scale", "gam")
_FWD_READER = _FWD[:5]
_BWD = ("q", "q_scale", "p", "w", "k", "k_scale", "gam")
_BWD_READER = _BWD[:4]


def _operands(ops: ScanOperands, names: tuple[str, ...], bv: int) -> tuple[list, list]:
    """``(arrays, block specs)`` of the named operands, chunk tensors flattened to rows."""
    n, t = ops.q_scale.shape
    nt, dk = ops.gam.shape[1], ops.w.shape[-1]
    table = {
        "q": (ops.q, _rows_spec(ops.q, n)),
        "q_scale": (ops.q_scale, _scale_spec(t)),
        "p": (flat_chunks(ops.p), _full_spec(t, t // nt)),
        "w": (flat_chunks(ops.w), _full_spec(t, dk)),
        "u0": (flat_chunks(ops.u0), _full_spec(t, bv, True)),
        "k": (ops.k, _rows_spec(ops.k, n)),
        "k_scale": (ops.k_scale, _scale_spec(t)),
        "gam": (ops.gam, pl.BlockSpec((None, nt), lambda i, j: (i, 0))),
    }
    return [table[x][0] for x in names], [table[x][1] for x in names]


def _fwd_kernel(*refs, chunk: int, num_chunks: int, write_states: bool, noisy: bool):
    """Inputs: the ``_FWD`` operands, ``s0`` [+ the noisy stream's ``_FWD_READER``]; outputs
    ``o, s_final`` [+ ``h``] [+ noisy ``o``]: block ``i`` of the noisy stream reads the state
    entering chunk ``i``."""
    (q, qs, p, w, u0, k, ks, gam, s0), refs = refs[:9], refs[9:]
    side, (o, s_final, *outs) = (refs[:5], refs[5:]) if noisy else ((), refs)
    h, o_side = (outs[0] if write_states else None), (outs[-1] if noisy else None)
    dk = q.shape[-1]

    def body(i, s):
        rows = pl.ds(i * chunk, chunk)
        if write_states:
            h[pl.ds(i * dk, dk), :] = s.astype(h.dtype)
        if noisy:
            nq, nqs, np_, nw, nu0 = side
            o_n, _ = out_step(nq[rows, :], np_[rows, :], nw[rows, :], nu0[rows, :], s.astype(w.dtype),
                              nqs[rows])
            o_side[rows, :] = o_n.astype(o_side.dtype)
        o_i, s = fwd_step(q[rows, :], p[rows, :], w[rows, :], u0[rows, :], k[rows, :], gam[i], s,
                          qs[rows], ks[rows])
        o[rows, :] = o_i.astype(o.dtype)
        return s

    s_final[...] = jax.lax.fori_loop(0, num_chunks, body, s0[...].astype(F32))


def _bwd_kernel(*refs, chunk: int, num_chunks: int, has_dh: bool, noisy: bool):
    """Inputs: the ``_BWD`` operands, ``do, ds_final`` [+ ``dh``] [+ the noisy stream's
    ``_BWD_READER`` and ``do``]; outputs ``du, dhn, ds0`` [+ noisy ``du``]."""
    (q, qs, p, w, k, ks, gam, do, ds_final), refs = refs[:9], refs[9:]
    dh, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    side, (du, dhn, ds0, *du_side) = (refs[:5], refs[5:]) if noisy else ((), refs)
    dk = q.shape[-1]

    def body(r, d):
        i = num_chunks - 1 - r
        rows, states = pl.ds(i * chunk, chunk), pl.ds(i * dk, dk)
        dhn[states, :] = d.astype(dhn.dtype)
        dh_i = None if dh is None else dh[states, :]
        du_i, d = bwd_step(q[rows, :], p[rows, :], w[rows, :], k[rows, :], gam[i], do[rows, :], d, dh_i,
                           qs[rows], ks[rows])
        du[rows, :] = du_i.astype(du.dtype)
        if noisy:
            nq, nqs, np_, nw, ndo = side
            du_n, ds_n = out_bwd(nq[rows, :], np_[rows, :], nw[rows, :], ndo[rows, :], None, nqs[rows])
            du_side[0][rows, :] = du_n.astype(du_side[0].dtype)
            d = d + ds_n
        return d

    ds0[...] = jax.lax.fori_loop(0, num_chunks, body, ds_final[...].astype(F32))


def _shape(ops: ScanOperands) -> tuple[int, int, int, int, int]:
    """``(N, NT, L, Dk, Dv)``."""
    n, nt, chunk, dk = ops.w.shape
    return n, nt, chunk, dk, ops.u0.shape[-1]


def scan_fwd(
    ops: ScanOperands,
    s0: jax.Array,
    *,
    write_states: bool,
    states_dtype: jax.typing.DTypeLike = F32,
    noisy: ScanOperands | None = None,
    heads: int | None = None,
    interpret: bool = False,
    tiling: Tiling = DEFAULT_TILING,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    """Forward scan. Returns ``o [N, NT, L, Dv]`` (u0's dtype; with ``heads``, written straight
    into the public ``[N / heads, NT * L, heads, Dv]`` layout instead), states entering each chunk
    ``[N, NT, Dk, Dv]`` in ``states_dtype`` (None unless ``write_states``; the carried state is
    fp32 either way), the final state ``[N, Dk, Dv]`` fp32 and the output of the ``noisy``
    stream (None without it): a second set of operands, same layout, whose chunk ``i`` reads the
    state entering chunk ``i`` and never updates it (the FLARE handoff with one chunk per noisy
    block)."""
    n, nt, chunk, dk, dv = _shape(ops)
    check_shapes(chunk, dk, dv, interpret)
    t = nt * chunk
    bv = tiling.width(n, dv)
    if heads is None:
        o_shape, o_spec = (n, t, dv), _full_spec(t, bv, True)
    else:  # program n writes column block j of head n % heads of batch row n // heads
        o_shape = (n // heads, t, heads, dv)
        o_spec = pl.BlockSpec((None, t, None, bv), lambda i, j: (i // heads, 0, i % heads, j))
    out_shape = [jax.ShapeDtypeStruct(o_shape, ops.u0.dtype), jax.ShapeDtypeStruct((n, dk, dv), F32)]
    out_specs = [o_spec, _full_spec(dk, bv, True)]
    if write_states:
        out_shape.append(jax.ShapeDtypeStruct((n, nt * dk, dv), states_dtype))
        out_specs.append(_full_spec(nt * dk, bv, True))
    args, in_specs = _operands(ops, _FWD, bv)
    args.append(s0)
    in_specs.append(_full_spec(dk, bv, True))
    widths = [dk, chunk, dk, bv, dk]
    if noisy is not None:
        check_noisy(ops, noisy)
        side, side_specs = _operands(noisy, _FWD_READER, bv)
        args += side
        in_specs += side_specs
        out_shape.append(jax.ShapeDtypeStruct(o_shape, noisy.u0.dtype))
        out_specs.append(o_spec)
        widths += [dk, chunk, dk, bv]
    outs = pl.pallas_call(
        functools.partial(
            _fwd_kernel, chunk=chunk, num_chunks=nt, write_states=write_states, noisy=noisy is not None
        ),
        out_shape=out_shape,
        grid=(n, dv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=tiling.params(_tile_bytes(chunk, widths, ops.w.dtype.itemsize), n * dv // bv),
        interpret=interpret,
        name="gated_delta_scan_fwd",
    )(*args)

    def shaped(o: jax.Array) -> jax.Array:
        return o.reshape(n, nt, chunk, dv) if heads is None else o

    h = outs[2].reshape(n, nt, dk, dv) if write_states else None
    return shaped(outs[0]), h, outs[1], (shaped(outs[-1]) if noisy is not None else None)


def scan_bwd(
    ops: ScanOperands,
    do: jax.Array,
    ds_final: jax.Array,
    dh: jax.Array | None,
    *,
    noisy: ScanOperands | None = None,
    do_noisy: jax.Array | None = None,
    interpret: bool = False,
    tiling: Tiling = BWD_TILING,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Reverse scan. ``do [N, NT, L, Dv]``, ``ds_final [N, Dk, Dv]``, ``dh`` (cotangent of the
    forward's states, or None), the ``noisy`` stream's operands and output cotangent (or None).
    Returns ``du [N, NT, L, Dv]``, the cotangent of the state leaving each chunk
    ``[N, NT, Dk, Dv]`` and the noisy ``du`` (or None) in the compute dtype (``w``'s: the
    chunk-cotangent products read them so; the carried cotangent is fp32), and that of the
    initial state ``[N, Dk, Dv]`` fp32."""
    n, nt, chunk, dk, dv = _shape(ops)
    t = nt * chunk
    bv = tiling.width(n, dv)
    args, in_specs = _operands(ops, _BWD, bv)
    args += [flat_chunks(do), ds_final]
    in_specs += [_full_spec(t, bv, True), _full_spec(dk, bv, True)]
    dt = ops.w.dtype
    out_shape = [
        jax.ShapeDtypeStruct((n, t, dv), dt),
        jax.ShapeDtypeStruct((n, nt * dk, dv), dt),
        jax.ShapeDtypeStruct((n, dk, dv), F32),
    ]
    out_specs = [_full_spec(t, bv, True), _full_spec(nt * dk, bv, True), _full_spec(dk, bv, True)]
    if dh is not None:
        in_specs.append(_full_spec(nt * dk, bv, True))
        args.append(flat_chunks(dh.astype(F32)))
    widths = [dk, chunk, dk, dk, bv]
    if noisy is not None:
        check_noisy(ops, noisy)
        side, side_specs = _operands(noisy, _BWD_READER, bv)
        args += [*side, flat_chunks(do_noisy)]
        in_specs += [*side_specs, _full_spec(t, bv, True)]
        out_shape.append(out_shape[0])
        out_specs.append(out_specs[0])
        widths += [dk, chunk, dk, bv]
    tile_bytes = _tile_bytes(chunk, widths, ops.w.dtype.itemsize) + (0 if dh is None else dk * bv * 4)
    outs = pl.pallas_call(
        functools.partial(
            _bwd_kernel, chunk=chunk, num_chunks=nt, has_dh=dh is not None, noisy=noisy is not None
        ),
        out_shape=out_shape,
        grid=(n, dv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=tiling.params(tile_bytes, n * dv // bv),
        interpret=interpret,
        name="gated_delta_scan_bwd",
    )(*args)
    du, dhn, ds0 = outs[0].reshape(n, nt, chunk, dv), outs[1].reshape(n, nt, dk, dv), outs[2]
    return du, dhn, ds0, (outs[3].reshape(n, nt, chunk, dv) if noisy is not None else None)
