"""Pure-jnp gated delta rule: the recurrent scan and the chunked (WY / UT-transform) form.

Recurrence per (batch, value head) with state ``S`` of shape ``[Dk, Dv]`` (fp32)::

    S' = exp(g_t) S_{t-1};  S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T;  o_t = S_t^T (scale q_t)

Before token ``t`` the state is zeroed when the token starts a new run of segment ids.

Chunked form (chunk of ``L`` tokens, state ``S_n`` entering chunk ``n``). With ``G`` the in-chunk
cumulative log decay (restarted at resets), ``M[i, j]`` "same run and j <= i", ``c_i`` "token i
continues the run that entered the chunk" and ``D[i, j] = M[i, j] exp(G_i - G_j)``::

    (I + A) [u0 | w] = [beta v | beta c exp(G) k],   A[i, j] = beta_i D[i, j] (k_i . k_j), j < i
    U   = u0 - w S_n                                  (the delta-rule corrected values)
    O   = (c exp(G) q) S_n + ((q k^T) * D) U
    S_{n+1} = c_L exp(G_L) S_n + (k * D[L, :])^T U

Segment resets are masks (``M``, ``c``), never large negative decays. ``prepare_chunks`` computes
the parallel per-chunk tensors; a ``scan`` function (``scan_chunks`` here, Pallas kernels
elsewhere) runs the sequential part; ``chunked_pipeline`` glues them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST
F32 = jnp.float32


class ChunkTensors(NamedTuple):
    """Per-chunk operands of the sequential scan, layout ``[N, NT, L, ...]`` (N = batch * heads)."""

    qg: jax.Array  # [N, NT, L, Dk]  c exp(G) scale q
    p: jax.Array  # [N, NT, L, L]   (scale q k^T) * D
    w: jax.Array  # [N, NT, L, Dk]
    u0: jax.Array  # [N, NT, L, Dv]
    kd: jax.Array  # [N, NT, L, Dk]  k * D[L-1, :]
    gam: jax.Array  # [N, NT]         c_L exp(G_L), fp32

    def blocks(self, per_block: int) -> ChunkTensors:
        """Rows ``(n, block)`` of ``per_block`` chunks each (a free reshape)."""
        return ChunkTensors(*(x.reshape(-1, per_block, *x.shape[2:]) for x in self))

    def cotangent(self, d: ChunkTensors) -> ChunkTensors:
        """``d`` (fp32 cotangents of these tensors) in their dtypes."""
        return ChunkTensors(*(g.astype(x.dtype) for g, x in zip(d, self, strict=True)))


# scan(operands, s0 [N, Dk, Dv], need_states, heads) -> (o, h [N, NT, Dk, Dv] fp32 states
# entering each chunk (may be None unless need_states), s_final [N, Dk, Dv] fp32); o is
# [N, NT, L, Dv] when heads is None, else the public [N / heads, NT * L, heads, Dv] (see
# ``public_output``). The operands are what the matching PrepareFn returns.
ScanFn = Callable[[object, jax.Array, bool, int | None], tuple[jax.Array, jax.Array | None, jax.Array]]


def reset_flags(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``[B, T]`` bool: True where the state resets before token t (never at t = 0)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    seg = segment_ids.astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def expand_heads(x: jax.Array, num_v_heads: int) -> jax.Array:
    """Repeat key heads so consecutive value heads share one (torch ``repeat_interleave``)."""
    rep = num_v_heads // x.shape[2]
    return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def default_scale(scale: float | None, dk: int) -> float:
    """The query scale: ``Dk^-0.5`` unless given."""
    return dk**-0.5 if scale is None else scale


def flat_initial_state(initial_state: jax.Array | None, b: int, hv: int, dk: int, dv: int) -> jax.Array:
    """``[B, Hv, Dk, Dv]`` (or None: zeros) -> the scans' fp32 ``[B * Hv, Dk, Dv]``."""
    s0 = jnp.zeros((b, hv, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    return s0.reshape(b * hv, dk, dv)


def public_output(o: jax.Array, heads: int) -> jax.Array:
    """A scan output ``[B * heads, NT, L, Dv]`` -> the public ``[B, NT * L, heads, Dv]``."""
    n, nt, chunk, dv = o.shape
    return jnp.moveaxis(o.reshape(n // heads, heads, nt * chunk, dv), 1, 2)


def flat_chunks(x: jax.Array) -> jax.Array:
    """``[N, NT, L, D]`` -> ``[N, NT * L, D]`` (the kernels' row layout)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def chunk_rows(x: jax.Array, chunk: int) -> jax.Array:
    """Inverse of ``flat_chunks``: ``[N, T, D]`` -> ``[N, T / chunk, chunk, D]``."""
    return x.reshape(x.shape[0], -1, chunk, x.shape[-1])


def chunked_output(o: jax.Array, chunk: int) -> jax.Array:
    """Inverse of ``public_output``: ``[B, T, H, Dv]`` -> ``[B * H, T / chunk, chunk, Dv]``."""
    b, t, h, dv = o.shape
    return jnp.moveaxis(o, 2, 1).reshape(b * h, t // chunk, chunk, dv)


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token ``lax.scan`` form. Shapes as in ``api.gated_delta_rule``; returns (o, S_T)."""
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    scale = default_scale(scale, dk)
    qf = expand_heads(q, hv).astype(F32) * scale
    kf = expand_heads(k, hv).astype(F32)
    s0 = jnp.zeros((b, hv, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    xs = (
        jnp.moveaxis(qf, 1, 0),
        jnp.moveaxis(kf, 1, 0),
        jnp.moveaxis(v.astype(F32), 1, 0),
        jnp.moveaxis(g.astype(F32), 1, 0),
        jnp.moveaxis(beta.astype(F32), 1, 0),
        jnp.moveaxis(reset_flags(segment_ids, b, t), 1, 0),
    )

    def step(s, x):
        qt, kt, vt, gt, bt, rt = x
        s = jnp.where(rt[:, None, None, None], 0.0, s) * jnp.exp(gt)[..., None, None]
        pred = jnp.einsum("bhkv,bhk->bhv", s, kt, precision=_HI)
        s = s + kt[..., :, None] * (bt[..., None] * (vt - pred))[..., None, :]
        return s, jnp.einsum("bhkv,bhk->bhv", s, qt, precision=_HI)

    s_final, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), s_final


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=F32)


def _segmented_cumsum(x: jax.Array, restart: jax.Array) -> jax.Array:
    """Cumulative sum over the last axis that starts afresh where ``restart`` is True."""

    def combine(left, right):
        (lx, lr), (rx, rr) = left, right
        return jnp.where(rr, rx, lx + rx), lr | rr

    restart = jnp.broadcast_to(restart, x.shape)
    return jax.lax.associative_scan(combine, (x, restart), axis=x.ndim - 1)[0]


_BASE_BLOCK = 16


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., L, L]`` (fp32), by matmuls only.

    Diagonal blocks of at most 16 rows are inverted by forward substitution (row i of
    ``X = I - a X`` needs rows < i); halves merge as
    ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``. Batched matmuls map to tensor
    cores on accelerators, unlike a batched triangular solve.
    """
    n = a.shape[-1]
    if n <= _BASE_BLOCK:

        def row(i, x):
            a_i = jax.lax.dynamic_index_in_dim(a, i, axis=a.ndim - 2, keepdims=False)
            x_i = (jnp.arange(n) == i).astype(a.dtype) - _mm("...j,...jk->...k", a_i, x)
            return jax.lax.dynamic_update_index_in_dim(x, x_i, i, axis=a.ndim - 2)

        return jax.lax.fori_loop(1, n, row, jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape))
    h = n // 2
    if n % 2:
        x11, x22 = unit_lower_inverse(a[..., :h, :h]), unit_lower_inverse(a[..., h:, h:])
    else:  # equal halves: one batched call
        x11, x22 = unit_lower_inverse(jnp.stack([a[..., :h, :h], a[..., h:, h:]]))
    x21 = -_mm("...ij,...jk->...ik", x22, _mm("...ij,...jk->...ik", a[..., h:, :h], x11))
    top = jnp.concatenate([x11, jnp.zeros((*a.shape[:-2], h, n - h), a.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)


def chunk_ids(reset: jax.Array, chunk: int) -> jax.Array:
    """``[B, T]`` reset flags -> ``[B, NT, L]`` int32 run ids relative to the run entering the
    chunk: ``M[i, j]`` is ``rel_i == rel_j`` (and j <= i), ``c_i`` is ``rel_i == 0``."""
    b, t = reset.shape
    run = jnp.cumsum(reset.astype(jnp.int32), axis=1).reshape(b, t // chunk, chunk)
    run_in = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), run[:, :-1, -1]], axis=1)
    return run - run_in[..., None]


def chunk_log_decays(g: jax.Array, reset: jax.Array, chunk: int) -> jax.Array:
    """``G``: ``g [B, H, T]`` -> ``[B, H, NT, L]`` fp32 in-chunk cumulative log decays restarted at
    every reset, so that a document's decays never pass through another document's sums (keeps
    documents bit-for-bit independent in fp32)."""
    b, h, t = g.shape
    gc = g.astype(F32).reshape(b, h, t // chunk, chunk)
    return _segmented_cumsum(gc, reset.reshape(b, 1, t // chunk, chunk))


def carry_decay(gcum: jax.Array, rel: jax.Array) -> jax.Array:
    """``gam = c_L exp(G_L)``: ``gcum [..., NT, L]``, ``rel`` broadcastable -> ``[..., NT]``."""
    return jnp.where(rel[..., -1] == 0, jnp.exp(gcum[..., -1]), 0.0)


def _masked_exp(keep: jax.Array, x: jax.Array) -> jax.Array:
    """``exp(x)`` where ``keep``, else 0 (never the exp of a masked value: no inf, no NaN
    gradient)."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def row_scales(gcum: jax.Array, rel: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(q_scale, k_scale)``, the per-token factors of ``qg = q_scale q`` (``scale c exp(G)``)
    and ``kd = k_scale k`` (``D[L - 1, :]``, the decay to the chunk's last token) from ``gcum``
    and ``rel`` ``[..., NT, L]`` (rel broadcastable); fp32."""
    q_scale = scale * _masked_exp(rel == 0, gcum)
    k_scale = _masked_exp(rel == rel[..., -1:], gcum[..., -1:] - gcum)
    return q_scale, k_scale


def chunk_tensors(
    qc: jax.Array,
    kc: jax.Array,
    vc: jax.Array,
    bc: jax.Array,
    gcum: jax.Array,
    rel: jax.Array,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(qg, p, w, u0, kd)`` (fp32) of chunked inputs ``[..., NT, L, D]``, gates ``bc``, ``gcum``
    ``[..., NT, L]`` fp32 and ``rel`` (``chunk_ids``, broadcastable). Matmul operands keep the
    input dtype, accumulation and everything decay-related is fp32."""
    chunk = qc.shape[-2]
    tri = jnp.tril(jnp.ones((chunk, chunk), bool))
    same = (rel[..., :, None] == rel[..., None, :]) & tri
    diff = gcum[..., :, None] - gcum[..., None, :]
    decay = _masked_exp(same, diff)  # D
    q_scale, k_scale = row_scales(gcum, rel, scale)
    eg = _masked_exp(rel == 0, gcum)  # c exp(G)

    kk = _mm("...id,...jd->...ij", kc, kc)
    a = jnp.tril(bc[..., :, None] * kk * decay, -1)
    t_inv = unit_lower_inverse(a)
    u0 = _mm("...ij,...jd->...id", t_inv, bc[..., None] * vc.astype(F32))
    w = _mm("...ij,...jd->...id", t_inv, (bc * eg)[..., None] * kc.astype(F32))
    p = _mm("...id,...jd->...ij", qc, kc) * (decay * scale)
    return q_scale[..., None] * qc.astype(F32), p, w, u0, k_scale[..., None] * kc.astype(F32)


def prepare_chunks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    reset: jax.Array,
    chunk: int,
    scale: float,
    out_dtype: jnp.dtype = F32,
) -> ChunkTensors:
    """Per-chunk tensors of the chunked form (differentiable, no sequential dependence).

    Public layout: q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]``; g, beta ``[B, T, Hv]``;
    reset: ``[B, T]`` bool, where ``reset[:, 0]`` True means the initial state is not seen.
    ``T`` must be a multiple of ``chunk``. Outputs (``[B * Hv, NT, L, ...]``) are cast to
    ``out_dtype`` (``gam`` stays fp32).
    """
    b, t, hv = g.shape
    nt = t // chunk

    def split(x):  # [B, T, H, ...] -> [B, H, NT, L, ...]
        x = jnp.moveaxis(expand_heads(x, hv), 2, 1)
        return x.reshape(b, hv, nt, chunk, *x.shape[3:])

    rel = chunk_ids(reset, chunk)[:, None]  # [B, 1, NT, L]
    gcum = chunk_log_decays(jnp.moveaxis(g, 2, 1), reset, chunk)
    tensors = chunk_tensors(split(q), split(k), split(v), split(beta.astype(F32)), gcum, rel, scale)

    def flat(x):
        return x.reshape(b * hv, *x.shape[2:]).astype(out_dtype)

    gam = carry_decay(gcum, rel).reshape(b * hv, nt)
    return ChunkTensors(*map(flat, tensors), gam)


# prepare(q, k, v, g, beta, reset, chunk, scale, out_dtype) -> the scan's operands (see
# prepare_chunks): ChunkTensors, or on the GPU the kernels' inputs (gpu_pass.KernelStream), from
# which the GPU pass prepares its chunk operands itself
PrepareFn = Callable[..., tuple]

prepare_remat: PrepareFn = jax.checkpoint(prepare_chunks, static_argnums=(6, 7, 8))


def scan_chunks(
    ct: ChunkTensors, s0: jax.Array, need_states: bool = True, heads: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sequential inter-chunk scan as a ``lax.scan`` (the XLA reference of the kernels).

    States are always returned (``need_states`` is accepted for the ``ScanFn`` contract)."""
    del need_states
    xs = tuple(jnp.moveaxis(x.astype(F32), 1, 0) for x in ct)

    def step(s, x):
        qg, p, w, u0, kd, gam = x
        u = u0 - _mm("nld,ndv->nlv", w, s)
        o = _mm("nld,ndv->nlv", qg, s) + _mm("nlm,nmv->nlv", p, u)
        s_next = gam[:, None, None] * s + _mm("nld,nlv->ndv", kd, u)
        return s_next, (o, s)

    s_final, (o, h) = jax.lax.scan(step, s0.astype(F32), xs)
    o = jnp.moveaxis(o, 0, 1)
    return (o if heads is None else public_output(o, heads)), jnp.moveaxis(h, 0, 1), s_final


def chunk_cotangents(
    ct: tuple, h: jax.Array, do: jax.Array, du: jax.Array, dh_next: jax.Array | None
) -> ChunkTensors:
    """fp32 cotangents of the chunk tensors one stream's scan operands ``ct`` stand for (XLA
    batched matmuls; ``ct``: ChunkTensors or the GPU's ScanOperands, of which ``w``, ``u0``,
    ``gam`` are read) from the states entering each chunk ``h``, the output cotangent ``do`` and the
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
        dgam = jnp.sum(h.astype(F32) * dh_next.astype(F32), axis=(-2, -1))
    return ChunkTensors(
        qg=_mm("ntlv,ntkv->ntlk", do_c, h_c),
        p=_mm("ntlv,ntmv->ntlm", do_c, u_c),
        w=-_mm("ntlv,ntkv->ntlk", du_c, h_c),
        u0=du,
        kd=dkd,
        gam=dgam,
    )


def chunked_pipeline(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None,
    initial_state: jax.Array | None,
    reset: jax.Array,
    chunk: int,
    scan: ScanFn,
    prepare: PrepareFn = prepare_remat,
    prep_dtype: jnp.dtype = F32,
    need_states: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Pad, prepare chunks, run ``scan``, unpad. Inputs in the public ``[B, T, H, D]`` layout.

    ``reset``: ``[B, T]`` bool (see ``prepare_chunks``); ``prepare`` builds the chunk tensors
    from the padded inputs (default: ``prepare_chunks``, rematerialised in the backward).
    Returns ``o [B, T, Hv, Dv]`` in v.dtype, ``h [B, Hv, NT, Dk, Dv]`` (states entering each
    chunk; may be None unless ``need_states``) and the final state, states in fp32.
    """
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    pad = -t % chunk

    def padded(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    scale = default_scale(scale, dk)
    ct = prepare(*map(padded, (q, k, v, g, beta, reset)), chunk, scale, prep_dtype)
    o, h, s_final = scan(ct, flat_initial_state(initial_state, b, hv, dk, dv), need_states, hv)
    return (
        o[:, :t].astype(v.dtype),
        None if h is None else h.reshape(b, hv, *h.shape[1:]),
        s_final.reshape(b, hv, dk, dv),
    )


def chunk_gated_delta_rule(
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
) -> tuple[jax.Array, jax.Array]:
    """Chunked form in pure jnp (jit-able, differentiable). Same contract as the recurrent form."""
    o, _, s_final = chunked_pipeline(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        reset=reset_flags(segment_ids, q.shape[0], q.shape[1]),
        chunk=chunk_size,
        scan=scan_chunks,
    )
    return o, s_final
