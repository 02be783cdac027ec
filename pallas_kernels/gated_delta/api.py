"""Public gated delta rule: backend dispatch, the FLARE handoff mode, the kernels' custom VJP."""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.gated_delta import gpu, gpu_prep, reference
from pallas_kernels.gated_delta.reference import F32, ChunkTensors, ScanFn
from pallas_kernels.residuals import named_residuals

# The scan kernels' operands of one stream: the GPU's (qg, kd as row-scaled q, k) or the
# chunk tensors themselves (TPU).
ScanInputs = gpu.ScanOperands | ChunkTensors


class GatedDeltaInputs(NamedTuple):
    """One stream of gated-delta inputs (shapes as in ``gated_delta_rule``)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array


def _kernels(backend: str) -> tuple[ModuleType, bool]:
    """The kernel module of a Pallas backend and whether it runs in interpret mode."""
    if backend.startswith("gpu"):
        from pallas_kernels.gated_delta import gpu as module
    else:
        from pallas_kernels.gated_delta import tpu as module
    return module, backend.endswith("_interpret")


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_scan(
    backend: str,
    need_states: bool,
    heads: int | None,
    ct: ScanInputs,
    s0: jax.Array,
    noisy: ScanInputs | None,
):
    """Kernel scan ``(o, h, s_final, o_noisy)`` (outputs in the public layout when ``heads``,
    see ``reference.ScanFn``); ``noisy``: a second stream whose chunk ``i`` reads the state
    entering chunk ``i`` (``o_noisy`` None without it). ``ct``, ``noisy``: the backend's
    operands (``gpu.ScanOperands``, ``reference.ChunkTensors`` on the TPU)."""
    module, interpret = _kernels(backend)
    return module.scan_fwd(ct, s0, write_states=need_states, noisy=noisy, heads=heads, interpret=interpret)


def _kernel_scan_fwd(backend: str, need_states: bool, heads: int | None, ct: ScanInputs, s0, noisy):
    module, interpret = _kernels(backend)
    kw = dict(noisy=noisy, heads=heads, interpret=interpret)
    o, h, s_final, o_noisy = module.scan_fwd(ct, s0, write_states=True, **kw)
    return (o, h if need_states else None, s_final, o_noisy), named_residuals((ct, h, noisy))


def _chunk_cotangents(
    ct: ScanInputs, h: jax.Array, do: jax.Array, du: jax.Array, dh_next: jax.Array | None
) -> ChunkTensors:
    """fp32 cotangents of the chunk tensors one stream's operands ``ct`` stand for (XLA batched
    matmuls) from the states entering each chunk ``h``, the output cotangent ``do`` and the
    reverse scan's ``du``; ``dh_next`` (the cotangent of the state leaving each chunk) is None
    for a stream that never updates the state (its ``kd`` and ``gam`` get zeros)."""
    # Matmul operands in the chunk tensors' dtype (bf16 on the fast path), fp32 accumulation.
    dt = ct.w.dtype
    h_c, do_c, du_c = h.astype(dt), do.astype(dt), du.astype(dt)
    u_c = (ct.u0.astype(F32) - _mm("ntlk,ntkv->ntlv", ct.w, h_c)).astype(dt)
    if dh_next is None:
        dkd, dgam = jnp.zeros(ct.w.shape, F32), jnp.zeros_like(ct.gam)
    else:
        dkd = _mm("ntlv,ntkv->ntlk", u_c, dh_next.astype(dt))
        dgam = jnp.sum(h * dh_next, axis=(-2, -1))
    return ChunkTensors(
        qg=_mm("ntlv,ntkv->ntlk", do_c, h_c),
        p=_mm("ntlv,ntmv->ntlm", do_c, u_c),
        w=-_mm("ntlv,ntkv->ntlk", du_c, h_c),
        u0=du,
        kd=dkd,
        gam=dgam,
    )


def _kernel_scan_bwd(backend: str, need_states: bool, heads: int | None, residuals, cotangents):
    """Kernel reverse scan for the state cotangents, then the per-chunk matmuls in XLA."""
    ct, h, noisy = residuals
    do, dh, ds_final, do_noisy = cotangents
    if heads is not None:
        chunk = ct.p.shape[2]
        do, do_noisy = (None if x is None else reference.chunked_output(x, chunk) for x in (do, do_noisy))
    module, interpret = _kernels(backend)
    du, dh_next, ds0, du_noisy = module.scan_bwd(
        ct, do, ds_final, dh if need_states else None, noisy=noisy, do_noisy=do_noisy, interpret=interpret
    )
    d_noisy = None
    if noisy is not None:
        d_noisy = noisy.cotangent(_chunk_cotangents(noisy, h, do_noisy, du_noisy, None))
    return ct.cotangent(_chunk_cotangents(ct, h, do, du, dh_next)), ds0, d_noisy


_kernel_scan.defvjp(_kernel_scan_fwd, _kernel_scan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_prepare(interpret: bool, chunk: int, scale: float, *inputs: jax.Array):
    return _kernel_prepare_fwd(interpret, chunk, scale, *inputs)[0]


def _kernel_prepare_fwd(interpret: bool, chunk: int, scale: float, *inputs: jax.Array):
    p, w, u0, t_inv = gpu_prep.prepare_fwd(*inputs, chunk=chunk, scale=scale, interpret=interpret)
    return (p, w, u0), named_residuals((inputs, (t_inv, w, u0)))


def _kernel_prepare_bwd(interpret: bool, chunk: int, scale: float, residuals, cotangents):
    """Kernel VJP (``T``, ``w``, ``u0`` saved by the forward); key-head gradients sum their
    value heads; the run ids get no cotangent."""
    inputs, saved = residuals
    dq, dk, *rest = gpu_prep.prepare_bwd(
        inputs, saved, cotangents, chunk=chunk, scale=scale, interpret=interpret
    )
    b, t, hk, width = inputs[0].shape
    dq, dk = (x.reshape(b, t, hk, -1, width).sum(3) for x in (dq, dk))
    return (*(d.astype(x.dtype) for d, x in zip((dq, dk, *rest), inputs, strict=False)), None)


_kernel_prepare.defvjp(_kernel_prepare_fwd, _kernel_prepare_bwd)


def _fused_prepare(interpret: bool) -> reference.PrepareFn:
    """``reference.prepare_chunks`` contract, returning ``gpu.ScanOperands``: the per-chunk work
    runs in the GPU kernels, which read the public layout directly; only the segmented decay
    cumsum, the run ids and the row scales stay in XLA (``[B, H, T]``-sized)."""

    def prepare(q, k, v, g, beta, reset, chunk, scale, out_dtype) -> gpu.ScanOperands:
        b, t, hv = g.shape
        n, nt = b * hv, t // chunk
        rel = reference.chunk_ids(reset, chunk)
        gcum = reference.chunk_log_decays(jnp.moveaxis(g, 2, 1), reset, chunk)
        gam = reference.carry_decay(gcum, rel[:, None]).reshape(n, nt)
        q_scale, k_scale = (x.reshape(n, t) for x in reference.row_scales(gcum, rel[:, None], scale))
        q, k, v = (x.astype(out_dtype) for x in (q, k, v))
        p, w, u0 = _kernel_prepare(
            interpret, chunk, scale, q, k, v, beta.astype(F32), gcum.reshape(n, t), rel.reshape(b, t)
        )
        p, w, u0 = (x.reshape(n, nt, chunk, -1) for x in (p, w, u0))
        return gpu.ScanOperands(q, q_scale, p, w, u0, k, k_scale, gam)

    return prepare


def _prepare_fn(backend: str) -> reference.PrepareFn:
    """Fused Pallas preparation on the GPU backends; the jnp one (XLA) elsewhere."""
    if backend.startswith("gpu"):
        return _fused_prepare(backend.endswith("_interpret"))
    return reference.prepare_remat


def _scan_fn(backend: str) -> ScanFn:
    if backend == "reference":
        return reference.scan_chunks
    return lambda ct, s0, need_states, heads=None: _kernel_scan(backend, need_states, heads, ct, s0, None)[:3]


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
        o_clean, _, s_final, o_noisy = _kernel_scan(backend, False, hv, ct, s0, ct_noisy)
    else:
        # Row (b, head) of the noisy tensors splits into its blocks, rows (b, head, block),
        # without a copy; their initial states are every block's first chunk state (a strided
        # slice of the clean scan's states, in the same row order).
        scan, per_block = _scan_fn(backend), block_size // chunk
        o_clean, h, s_final = scan(ct, s0, True, hv)
        blocks = ct_noisy.blocks(per_block)
        o_noisy, _, _ = scan(blocks, h[:, ::per_block].reshape(-1, dk, dv), False, None)
        o_noisy = reference.public_output(o_noisy.reshape(ct_noisy.u0.shape), hv)
    return o_clean.astype(clean.v.dtype), o_noisy.astype(noisy.v.dtype), s_final.reshape(b, hv, dk, dv)


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
