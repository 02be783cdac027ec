"""One custom VJP around the GPU preparation kernels and the scan of one chunked pass.

The forward runs ``gpu_prep`` (``p``, ``w``, ``u0``, ``T`` per stream) and one ``gpu.scan_fwd``
over the streams' :class:`gpu.ScanOperands`, which never form ``qg`` and ``kd``. The backward
runs the reverse scan, the chunk tensors' cotangents (``gpu_cotangents``: both streams in one
kernel that reads the states once; those of ``qg`` and ``kd`` included, in the compute dtype)
and the preparation backward kernel, which takes all of them and writes ``dq``, ``dk`` in the
public layout itself. As one VJP, the kernels' residuals (``T``, ``p``, ``w``, ``u0``, the chunk
states) are named once (``pallas_kernels.residuals``), so that a remat policy keeps one copy of
each.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import gpu, gpu_cotangents, gpu_prep, reference
from pallas_kernels.gated_delta.reference import ChunkTensors
from pallas_kernels.residuals import named_residuals


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q", "k", "v", "beta", "gcum", "rel", "gam"],
    meta_fields=["scale"],
)
@dataclasses.dataclass(frozen=True)
class KernelStream:
    """One stream's inputs to the GPU kernels, in their layouts (built in XLA by
    ``api._gpu_prepare``; T a multiple of the chunk)."""

    q: jax.Array  # [B, T, Hk, Dk] compute dtype
    k: jax.Array  # [B, T, Hk, Dk]
    v: jax.Array  # [B, T, Hv, Dv]
    beta: jax.Array  # [B, T, Hv] fp32
    gcum: jax.Array  # [B * Hv, T] fp32, reference.chunk_log_decays
    rel: jax.Array  # [B, T] int32, reference.chunk_ids
    gam: jax.Array  # [B * Hv, NT] fp32, reference.carry_decay
    scale: float

    @property
    def chunk(self) -> int:
        return self.q.shape[1] // self.gam.shape[1]

    def blocks(self, per_block: int) -> KernelStream:
        """Rows ``(b, block)`` of ``per_block`` chunks each: a free reshape of the public
        arrays; the per-head ``[B * Hv, ...]`` arrays are reordered to rows
        ``(b, block, head)``, the order of the scan's programs over the reshaped batch."""
        b, t = self.rel.shape
        nb = self.gam.shape[1] // per_block

        def public(x: jax.Array) -> jax.Array:
            return x.reshape(b * nb, t // nb, *x.shape[2:])

        def per_head(x: jax.Array) -> jax.Array:
            hv = x.shape[0] // b
            return jnp.moveaxis(x.reshape(b, hv, nb, -1), 1, 2).reshape(b * nb * hv, -1)

        return KernelStream(
            *map(public, (self.q, self.k, self.v, self.beta)),
            per_head(self.gcum), public(self.rel), per_head(self.gam), self.scale,
        )  # fmt: skip


def block_starts(h: jax.Array, batch: int, per_block: int) -> jax.Array:
    """States entering every block ``[N, NT, Dk, Dv]`` (rows ``(b, head)``) -> the initial
    states of ``KernelStream.blocks`` ``[B * NB * Hv, Dk, Dv]`` (rows ``(b, block, head)``)."""
    n, _, dk, dv = h.shape
    starts = h[:, ::per_block].reshape(batch, n // batch, -1, dk, dv)
    return jnp.moveaxis(starts, 1, 2).reshape(-1, dk, dv)


def _operands(stream: KernelStream, p: jax.Array, w: jax.Array, u0: jax.Array) -> gpu.ScanOperands:
    """The scan's operands from the stream and its chunk tensors ``[N, NT, L, ...]``; the row
    scales of ``qg`` and ``kd`` in XLA (``[B * Hv, T]``)."""
    n, t = stream.gcum.shape
    b, nt = stream.rel.shape[0], stream.gam.shape[1]
    gcum = stream.gcum.reshape(b, n // b, nt, t // nt)
    rel = stream.rel.reshape(b, 1, nt, t // nt)
    q_scale, k_scale = (x.reshape(n, t) for x in reference.row_scales(gcum, rel, stream.scale))
    return gpu.ScanOperands(stream.q, q_scale, p, w, u0, stream.k, k_scale, stream.gam)


def _prepare(stream: KernelStream, interpret: bool) -> tuple[gpu.ScanOperands, jax.Array]:
    """The preparation kernels of one stream: its scan operands and ``T``."""
    chunk = stream.chunk
    p, w, u0, t_inv = gpu_prep.prepare_fwd(
        stream.q, stream.k, stream.v, stream.beta, stream.gcum, stream.rel,
        chunk=chunk, scale=stream.scale, interpret=interpret,
    )  # fmt: skip
    return _operands(stream, *(reference.chunk_rows(x, chunk) for x in (p, w, u0))), t_inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def gpu_pass(
    interpret: bool,
    need_states: bool,
    heads: int | None,
    stream: KernelStream,
    s0: jax.Array,
    noisy: KernelStream | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
    """``(o, h, s_final, o_noisy)`` as ``gpu.scan_fwd`` returns them (``h`` None unless
    ``need_states``) for the stream (and a ``noisy`` stream whose chunk ``i`` reads the state
    entering chunk ``i``), preparation included. ``s0``: ``[B * Hv, Dk, Dv]`` fp32."""
    ops, _ = _prepare(stream, interpret)
    side = None if noisy is None else _prepare(noisy, interpret)[0]
    return gpu.scan_fwd(ops, s0, write_states=need_states, noisy=side, heads=heads, interpret=interpret)


def _gpu_pass_fwd(interpret, need_states, heads, stream, s0, noisy):
    ops, t_inv = _prepare(stream, interpret)
    side = None if noisy is None else _prepare(noisy, interpret)
    # The states are the backward's residual, read by its compute-dtype products (and by the
    # decay cotangent), so they are stored in that dtype, as fla stores them; the caller's
    # states (need_states: they start the noisy blocks) stay fp32.
    o, h, s_final, o_noisy = gpu.scan_fwd(
        ops, s0, write_states=True, states_dtype=jnp.float32 if need_states else ops.w.dtype,
        noisy=None if side is None else side[0], heads=heads, interpret=interpret,
    )  # fmt: skip
    kept = [_kernel_outputs(ops, t_inv), None if side is None else _kernel_outputs(*side)]
    # The streams themselves are the caller's values: a remat policy keeps or rebuilds them.
    return (o, h if need_states else None, s_final, o_noisy), (stream, noisy, named_residuals((kept, h)))


def _kernel_outputs(ops: gpu.ScanOperands, t_inv: jax.Array) -> tuple[jax.Array, ...]:
    """What the preparation kernels made: ``(p, w, u0, T)``."""
    return ops.p, ops.w, ops.u0, t_inv


def _stream_cotangent(stream: KernelStream, kept: tuple, d: ChunkTensors, interpret: bool) -> KernelStream:
    """The preparation backward kernel: cotangents of the stream from those of its chunk
    tensors (``d``: as ``gpu_cotangents.chunk_cotangents`` returns them, flat ``[N, T, width]``
    in the compute dtype, or in the chunk layout ``[N, NT, L, width]``)."""
    p, w, u0, t_inv = kept
    cots = tuple(reference.flat_chunks(x) for x in (d.qg, d.p, d.w, d.u0, d.kd))
    inputs = (stream.q, stream.k, stream.v, stream.beta, stream.gcum, stream.rel)
    saved = (t_inv, reference.flat_chunks(w), reference.flat_chunks(u0))
    dq, dk, dv, dbeta, dgcum = gpu_prep.prepare_bwd(
        inputs, saved, cots, chunk=stream.chunk, scale=stream.scale, interpret=interpret
    )
    b, t, hk, width = stream.q.shape
    if dq.shape[2] != hk:  # GQA: the fp32 sum over the value heads of each key head
        dq, dk = (x.reshape(b, t, hk, -1, width).sum(3).astype(stream.q.dtype) for x in (dq, dk))
    return KernelStream(dq, dk, dv, dbeta, dgcum, None, d.gam, stream.scale)


def _gpu_pass_bwd(interpret, need_states, heads, residuals, cotangents):
    stream, noisy, (kept, h) = residuals
    do, dh, ds_final, do_noisy = cotangents
    ops = _operands(stream, *kept[0][:3])
    side = None if noisy is None else _operands(noisy, *kept[1][:3])
    if heads is not None:
        chunk = stream.chunk
        do, do_noisy = (None if x is None else reference.chunked_output(x, chunk) for x in (do, do_noisy))
    du, dh_next, ds0, du_noisy = gpu.scan_bwd(
        ops, do, ds_final, dh if need_states else None, noisy=side, do_noisy=do_noisy, interpret=interpret
    )
    d, d_side = gpu_cotangents.chunk_cotangents(
        ops, h, do, du, dh_next, noisy=side, do_noisy=do_noisy, du_noisy=du_noisy, interpret=interpret
    )
    d = _stream_cotangent(stream, kept[0], d, interpret)
    d_noisy = None if noisy is None else _stream_cotangent(noisy, kept[1], d_side, interpret)
    return d, ds0, d_noisy


gpu_pass.defvjp(_gpu_pass_fwd, _gpu_pass_bwd)
