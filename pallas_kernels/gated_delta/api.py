"""Public gated delta rule: backend dispatch, the FLARE handoff mode, the kernels' custom VJP."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.gated_delta import reference
from pallas_kernels.gated_delta.gpu_pass import KernelStream, block_starts, gpu_pass
from pallas_kernels.gated_delta.reference import F32, ChunkTensors, ScanFn
from pallas_kernels.residuals import named_residuals


class GatedDeltaInputs(NamedTuple):
    """One stream of gated-delta inputs (shapes as in ``gated_delta_rule``)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array


def _tpu() -> ModuleType:
    """The TPU kernels, imported when a TPU backend first runs."""
    from pallas_kernels.gated_delta import tpu

    return tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tpu_scan(
    interpret: bool,
    need_states: bool,
    heads: int | None,
    ct: ChunkTensors,
    s0: jax.Array,
    noisy: ChunkTensors | None,
):
    """TPU kernel scan ``(o, h, s_final, o_noisy)`` (outputs in the public layout when
    ``heads``, see ``reference.ScanFn``); ``noisy``: a second stream whose chunk ``i`` reads the
    state entering chunk ``i`` (``o_noisy`` None without it)."""
    return _tpu().scan_fwd(ct, s0, write_states=need_states, noisy=noisy, heads=heads, interpret=interpret)


def _tpu_scan_fwd(interpret: bool, need_states: bool, heads: int | None, ct: ChunkTensors, s0, noisy):
    kw = dict(noisy=noisy, heads=heads, interpret=interpret)
    o, h, s_final, o_noisy = _tpu().scan_fwd(ct, s0, write_states=True, **kw)
    return (o, h if need_states else None, s_final, o_noisy), named_residuals((ct, h, noisy))


def _tpu_scan_bwd(interpret: bool, need_states: bool, heads: int | None, residuals, cotangents):
    """Kernel reverse scan for the state cotangents, then the per-chunk matmuls in XLA."""
    ct, h, noisy = residuals
    do, dh, ds_final, do_noisy = cotangents
    if heads is not None:
        chunk = ct.p.shape[2]
        do, do_noisy = (None if x is None else reference.chunked_output(x, chunk) for x in (do, do_noisy))
    du, dh_next, ds0, du_noisy = _tpu().scan_bwd(
        ct, do, ds_final, dh if need_states else None, noisy=noisy, do_noisy=do_noisy, interpret=interpret
    )
    d_noisy = None
    if noisy is not None:
        d_noisy = noisy.cotangent(reference.chunk_cotangents(noisy, h, do_noisy, du_noisy, None))
    return ct.cotangent(reference.chunk_cotangents(ct, h, do, du, dh_next)), ds0, d_noisy


_tpu_scan.defvjp(_tpu_scan_fwd, _tpu_scan_bwd)


def _gpu_prepare(q, k, v, g, beta, reset, chunk, scale, out_dtype) -> KernelStream:
    """``reference.PrepareFn`` of the GPU backends: only the segmented decay cumsum, the run ids
    and the carry decays, in XLA (``[B, H, T]``-sized); the per-chunk work runs in
    ``gpu_pass`` (the preparation kernels read the public layout directly)."""
    b, t, hv = g.shape
    rel = reference.chunk_ids(reset, chunk)
    gcum = reference.chunk_log_decays(jnp.moveaxis(g, 2, 1), reset, chunk)
    gam = reference.carry_decay(gcum, rel[:, None]).reshape(b * hv, t // chunk)
    q, k, v = (x.astype(out_dtype) for x in (q, k, v))
    return KernelStream(q, k, v, beta.astype(F32), gcum.reshape(b * hv, t), rel.reshape(b, t), gam, scale)


def _prepare_fn(backend: str) -> reference.PrepareFn:
    """The GPU kernels' inputs on the GPU backends; the jnp chunk tensors (XLA) elsewhere."""
    return _gpu_prepare if backend.startswith("gpu") else reference.prepare_remat


# (operands, s0, need_states, heads, noisy operands or None) -> (o, h, s_final, o_noisy)
PassFn = Callable[..., tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]]


def _pass_fn(backend: str) -> PassFn:
    """One chunked pass on a kernel backend: the GPU's preparation + scan, or the TPU scan."""
    interpret = backend.endswith("_interpret")
    kernel = gpu_pass if backend.startswith("gpu") else _tpu_scan

    def run(ct, s0, need_states, heads, noisy=None):
        return kernel(interpret, need_states, heads, ct, s0, noisy)

    return run


def _scan_fn(backend: str) -> ScanFn:
    if backend == "reference":
        return reference.scan_chunks
    run = _pass_fn(backend)
    return lambda ct, s0, need_states, heads=None: run(ct, s0, need_states, heads)[:3]


def _prep_dtype(backend: str, v: jax.Array) -> jnp.dtype:
    """Reference keeps fp32 chunk tensors; kernels read them in the input dtype."""
    return jnp.float32 if backend == "reference" else v.dtype


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule; returns ``(o, final_state)``.

    q, k: ``[B, T, Hk, Dk]`` (L2-normalised); v: ``[B, T, Hv, Dv]`` with ``Hv % Hk == 0``;
    g (log decay, <= 0), beta: ``[B, T, Hv]``; initial_state: ``[B, Hv, Dk, Dv]`` or None;
    segment_ids: ``[B, T]`` int or None (state resets where the id changes). ``o`` has v's dtype,
    the final state is fp32. ``T == 1`` uses the recurrent step.
    """
    backend = resolve_backend(backend)
    if q.shape[1] == 1:
        return reference.recurrent_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids
        )
    o, _, s_final = reference.chunked_pipeline(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        reset=reference.reset_flags(segment_ids, q.shape[0], q.shape[1]),
        chunk=chunk_size,
        scan=_scan_fn(backend),
        prepare=_prepare_fn(backend),
        prep_dtype=_prep_dtype(backend, v),
    )
    return o, s_final


def _handoff_scans(
    clean: GatedDeltaInputs,
    noisy: GatedDeltaInputs,
    reset: jax.Array,
    *,
    scale: float | None,
    initial_state: jax.Array | None,
    chunk: int,
    block_size: int,
    backend: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``gated_delta_rule_handoff`` on inputs padded to whole blocks. Both streams are prepared
    per chunk in the same ``[B * Hv, NT]`` layout (a reset at a block's first token hides the
    entering state in the noisy stream's own tensors)."""
    b, t, _, dk = clean.q.shape
    hv, dv = clean.v.shape[2:]
    scale = reference.default_scale(scale, dk)
    prepare, dtype = _prepare_fn(backend), _prep_dtype(backend, clean.v)
    ct, ct_noisy = (prepare(*x, reset, chunk, scale, dtype) for x in (clean, noisy))
    s0 = reference.flat_initial_state(initial_state, b, hv, dk, dv)
    if chunk == block_size and backend != "reference":
        o_clean, _, s_final, o_noisy = _pass_fn(backend)(ct, s0, False, hv, ct_noisy)
    else:
        scan, per_block = _scan_fn(backend), block_size // chunk
        o_clean, h, s_final = scan(ct, s0, True, hv)
        o_noisy = _noisy_blocks(scan, ct_noisy, h, per_block, b, hv)
    return o_clean.astype(clean.v.dtype), o_noisy.astype(noisy.v.dtype), s_final.reshape(b, hv, dk, dv)


def _noisy_blocks(scan: ScanFn, ct_noisy, h: jax.Array, per_block: int, b: int, hv: int) -> jax.Array:
    """The noisy stream's blocks of ``per_block`` chunks as one batched scan, each block from
    the clean state entering it (``h``: the clean scan's states); output ``[B, T, Hv, Dv]``."""
    if isinstance(ct_noisy, KernelStream):
        # The public arrays split into rows (b, block) without a copy; the GPU kernels read them
        # in place, so the start states are reordered to the programs' rows (b, block, head).
        o, _, _ = scan(ct_noisy.blocks(per_block), block_starts(h, b, per_block), False, hv)
        return o.reshape(b, -1, *o.shape[2:])
    # Chunk tensors: row (b, head) splits into its blocks, rows (b, head, block), without a
    # copy; the start states are a strided slice of the clean states in the same row order.
    dk, dv = h.shape[2:]
    o, _, _ = scan(ct_noisy.blocks(per_block), h[:, ::per_block].reshape(-1, dk, dv), False, None)
    return reference.public_output(o.reshape(ct_noisy.u0.shape), hv)


def gated_delta_rule_handoff(
    clean: GatedDeltaInputs,
    noisy: GatedDeltaInputs,
    *,
    block_size: int,
    segment_ids: jax.Array | None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FLARE recurrent-state handoff; returns ``(o_clean, o_noisy, final_state_of_clean)``.

    Block ``b`` covers tokens ``[b * block_size, (b + 1) * block_size)``. Its noisy tokens start
    from the clean state just before clean token ``b * block_size`` and run causally within the
    block (same segment resets, including at the block's first token); they never feed later
    blocks. The clean stream runs with chunk ``gcd(chunk_size, block_size)`` so that block starts
    are chunk boundaries. When that chunk is the block (``block_size`` divides ``chunk_size``),
    the kernel backends run both streams in one scan: chunk ``b`` writes noisy block ``b``'s
    output from the state entering it, and no block state is stored. Otherwise (and on the
    reference backend) the clean scan emits its chunk states and all noisy blocks run as one
    batched chunked scan from the block starts.
    """
    backend = resolve_backend(backend)
    b, t = clean.q.shape[:2]
    pad = -t % block_size

    def padded(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    o_clean, o_noisy, s_final = _handoff_scans(
        GatedDeltaInputs(*map(padded, clean)),
        GatedDeltaInputs(*map(padded, noisy)),
        padded(reference.reset_flags(segment_ids, b, t)),
        scale=scale,
        initial_state=initial_state,
        chunk=math.gcd(chunk_size, block_size),
        block_size=block_size,
        backend=backend,
    )
    return o_clean[:, :t], o_noisy[:, :t], s_final
