"""Pallas GPU (Triton lowering) kernels for the per-chunk preparation of the chunked form + VJP.

Grid ``(N, NT)`` (N = batch * heads): one program per chunk computes, in registers, the decays,
the masked ``A = beta (k k^T) * D`` and the unit-lower inverse ``T = (I + A)^-1`` as blocks of
``bs = min(16, L)`` rows (diagonal blocks by nilpotent doubling, off-diagonal blocks by block
forward substitution), then ``(qg, p, w, u0, kd)`` of ``reference.chunk_tensors`` (``w``,
``u0`` by row blocks of ``T``; ``qg``, ``kd`` and ``p`` as whole-chunk tiles). Nothing
``[L, L]``-sized but ``p`` reaches HBM; the backward recomputes ``A``, ``T``, ``w``, ``u0``.

Backward (cotangents ``dqg, dp, dw, du0, dkd``), with ``Y_u = beta v``, ``Y_w = beta c e^G k``::

    dY = T^T d(u0 | w);   dA = -tril(dY_u u0^T + dY_w w^T, -1)   (as dA = -T^T dT T^T)

then the chain rule through ``A``, ``p``, ``qg``, ``kd`` to q, k, v, beta and ``G``. Matmul
operands are in the inputs' dtype (bf16 on the fast path) with fp32 accumulation; the inverse,
decays and gates are fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta.gpu import check_shapes

F32 = jnp.float32
_MAX_BLOCK = 16


def _dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False, dtype=None):
    """``a @ b`` (``ta``/``tb``: transpose a/b) with operands cast to ``dtype`` (default: a's),
    fp32 accumulation; fp32 operands stay IEEE fp32 (no TF32)."""
    dtype = a.dtype if dtype is None else dtype
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        dims,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=F32,
    )


def _iota(bs: int, axis: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (bs, bs), axis)


def _decay(same: jax.Array, diff: jax.Array) -> jax.Array:
    """``exp(diff)`` where ``same`` (the same run, causal), else 0 (never exp of a masked value)."""
    return jnp.where(same, jnp.exp(jnp.where(same, diff, 0.0)), 0.0)


def _diag_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^-1`` of a strictly lower ``[bs, bs]`` block: ``(I - a)(I + a^2)(I + a^4)...``
    (``a`` is nilpotent, ``a^bs = 0``)."""
    bs = a.shape[0]
    n = -a
    x = (_iota(bs, 0) == _iota(bs, 1)).astype(F32) + n
    power = 2
    while power < bs:
        n = _dot(n, n)
        x = x + _dot(x, n)
        power *= 2
    return x


class _Chunk:
    """Gates, decays and the blocked ``A`` / ``T`` of one chunk (block-indexed dicts)."""

    def __init__(self, k_ref, v_ref, beta_ref, g_ref, rel_ref, bs: int):
        self.nb = nb = k_ref.shape[0] // bs
        self.k = functools.partial(_rows, k_ref, bs)
        self.v = functools.partial(_rows, v_ref, bs)
        self.b = [_rows(beta_ref, bs, a).astype(F32) for a in range(nb)]
        self.g = [_rows(g_ref, bs, a).astype(F32) for a in range(nb)]
        self.r = [_rows(rel_ref, bs, a) for a in range(nb)]
        self.e = [jnp.where(r == 0, jnp.exp(g), 0.0) for r, g in zip(self.r, self.g, strict=True)]
        last = jax.lax.broadcasted_iota(jnp.int32, (bs,), 0) == bs - 1
        g_last = jnp.sum(jnp.where(last, self.g[-1], 0.0))
        r_last = jnp.sum(jnp.where(last, self.r[-1], 0))
        self.last = last
        # Last row of D (decay from each token to the chunk's end).
        self.dl = [_decay(r_last == r, g_last - g) for r, g in zip(self.r, self.g, strict=True)]
        lower, strict = _iota(bs, 0) >= _iota(bs, 1), _iota(bs, 0) > _iota(bs, 1)
        self.d, self.kk, self.a, self.strict = {}, {}, {}, strict
        for i in range(nb):
            for j in range(i + 1):
                same = self.r[i][:, None] == self.r[j][None, :]
                same = same & lower if i == j else same
                self.d[i, j] = _decay(same, self.g[i][:, None] - self.g[j][None, :])
                self.kk[i, j] = _dot(self.k(i), self.k(j), tb=True)
                a = self.b[i][:, None] * self.kk[i, j] * self.d[i, j]
                self.a[i, j] = jnp.where(strict, a, 0.0) if i == j else a
        self.t = {}
        for i in range(nb):
            self.t[i, i] = _diag_inverse(self.a[i, i])
            for j in range(i):
                acc = sum(_dot(self.a[i, m], self.t[m, j]) for m in range(j, i))
                self.t[i, j] = -_dot(self.t[i, i], acc)

    def y_w(self, j: int) -> jax.Array:
        """Row block j of ``beta c e^G k`` (fp32), the right-hand side of ``w``."""
        return (self.b[j] * self.e[j])[:, None] * self.k(j).astype(F32)

    def y_u(self, j: int) -> jax.Array:
        """Row block j of ``beta v`` (fp32), the right-hand side of ``u0``."""
        return self.b[j][:, None] * self.v(j).astype(F32)

    def apply_t(self, i: int, y: Callable[[int], jax.Array], dtype) -> jax.Array:
        """Row block ``i`` of ``T Y`` (``y(j)``: row block j of Y)."""
        return sum(_dot(self.t[i, j], y(j), dtype=dtype) for j in range(i + 1))

    def apply_tt(self, j: int, y: Callable[[int], jax.Array], dtype) -> jax.Array:
        """Row block ``j`` of ``T^T Y``."""
        return sum(_dot(self.t[i, j], y(i), ta=True, dtype=dtype) for i in range(j, self.nb))


def _rows(ref, bs: int, i: int) -> jax.Array:
    """Row block ``i`` of a chunk ref (1-D gates or ``[L, D]`` tiles)."""
    rows = pl.ds(i * bs, bs)
    return ref[rows] if len(ref.shape) == 1 else ref[rows, :]


def _fwd_kernel(q, k, v, beta, g, rel, qg, p, w, u0, kd, *, scale: float, bs: int):
    c = _Chunk(k, v, beta, g, rel, bs)
    dt = k.dtype
    # p, qg and kd as whole-chunk tiles (p: one [L, Dk] x [Dk, L] dot instead of 16 x 16
    # blocks); only T and its products need the 16-row blocks.
    chunk = k.shape[0]
    g_all, r_all, q_all, k_all = g[...].astype(F32), rel[...], q[...], k[...]
    same = (r_all[:, None] == r_all[None, :]) & (_iota(chunk, 0) >= _iota(chunk, 1))
    decay = _decay(same, g_all[:, None] - g_all[None, :])
    p[...] = (scale * _dot(q_all, k_all, tb=True) * decay).astype(p.dtype)
    e = jnp.where(r_all == 0, jnp.exp(g_all), 0.0)
    qg[...] = (scale * e[:, None] * q_all.astype(F32)).astype(qg.dtype)
    last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    g_last, r_last = jnp.sum(jnp.where(last, g_all, 0.0)), jnp.sum(jnp.where(last, r_all, 0))
    dl = _decay(r_all == r_last, g_last - g_all)
    kd[...] = (dl[:, None] * k_all.astype(F32)).astype(kd.dtype)
    for i in range(c.nb):
        rows = pl.ds(i * bs, bs)
        w[rows, :] = c.apply_t(i, c.y_w, dt).astype(w.dtype)
        u0[rows, :] = c.apply_t(i, c.y_u, dt).astype(u0.dtype)


def _bwd_kernel(q, k, v, beta, g, rel, dqg, dp, dw, du0, dkd, dq, dk, dv, dbeta, dg, *, scale, bs):
    c = _Chunk(k, v, beta, g, rel, bs)
    dt, nb = k.dtype, c.nb

    def cot(ref):
        return lambda i: _rows(ref, bs, i).astype(F32)

    # Only dot operands: kept in the compute dtype (halves their registers on the bf16 path).
    u0_ = [c.apply_t(i, c.y_u, dt).astype(dt) for i in range(nb)]
    w_ = [c.apply_t(i, c.y_w, dt).astype(dt) for i in range(nb)]
    dyu = [c.apply_tt(j, cot(du0), dt) for j in range(nb)]
    dyw = [c.apply_tt(j, cot(dw), dt) for j in range(nb)]
    db = [jnp.zeros((bs,), F32) for _ in range(nb)]
    dgs = [jnp.zeros((bs,), F32) for _ in range(nb)]
    dkk, ds = {}, {}  # cotangents of k_i k_j^T and of q_i k_j^T (scaled, masked)
    for i in range(nb):
        q_i = _rows(q, bs, i)
        for j in range(i + 1):
            da = -(_dot(dyu[i], u0_[j], tb=True, dtype=dt) + _dot(dyw[i], w_[j], tb=True, dtype=dt))
            da = jnp.where(c.strict, da, 0.0) if i == j else da
            dkk[i, j] = da * c.b[i][:, None] * c.d[i, j]
            db[i] += jnp.sum(da * c.kk[i, j] * c.d[i, j], axis=1)
            dp_ij = scale * dp[pl.ds(i * bs, bs), pl.ds(j * bs, bs)].astype(F32)
            ds[i, j] = dp_ij * c.d[i, j]
            qk = _dot(q_i, c.k(j), tb=True)
            dd = (da * c.b[i][:, None] * c.kk[i, j] + dp_ij * qk) * c.d[i, j]
            dgs[i] += jnp.sum(dd, axis=1)
            dgs[j] -= jnp.sum(dd, axis=0)
    dl_total = jnp.zeros((), F32)
    for i in range(nb):
        rows = pl.ds(i * bs, bs)
        q_i, k_i, v_i = _rows(q, bs, i).astype(F32), c.k(i).astype(F32), c.v(i).astype(F32)
        dqg_i, dkd_i = _rows(dqg, bs, i).astype(F32), _rows(dkd, bs, i).astype(F32)
        kyw = jnp.sum(k_i * dyw[i], axis=1)
        db[i] += jnp.sum(v_i * dyu[i], axis=1) + c.e[i] * kyw
        de = c.b[i] * kyw + scale * jnp.sum(q_i * dqg_i, axis=1)
        ddl = jnp.sum(k_i * dkd_i, axis=1) * c.dl[i]
        dl_total += jnp.sum(ddl)
        dgs[i] += de * c.e[i] - ddl
        dq_i = scale * c.e[i][:, None] * dqg_i
        dk_i = c.dl[i][:, None] * dkd_i + (c.b[i] * c.e[i])[:, None] * dyw[i]
        for j in range(i + 1):
            dq_i += _dot(ds[i, j], c.k(j), dtype=dt)
            dk_i += _dot(dkk[i, j], c.k(j), dtype=dt)
        for m in range(i, nb):
            dk_i += _dot(dkk[m, i], c.k(m), ta=True, dtype=dt)
            dk_i += _dot(ds[m, i], _rows(q, bs, m), ta=True, dtype=dt)
        dq[rows, :] = dq_i.astype(dq.dtype)
        dk[rows, :] = dk_i.astype(dk.dtype)
        dv[rows, :] = (c.b[i][:, None] * dyu[i]).astype(dv.dtype)
        dbeta[rows] = db[i]
        # G_L enters every entry of D's last row: its cotangent lands on the chunk's last token.
        dg[rows] = dgs[i] + jnp.where(c.last, dl_total, 0.0) if i == nb - 1 else dgs[i]


class _Layout:
    """Block specs of grid ``(B * Hv, NT)`` over the public layout (q, k ``[B, T, Hk, Dk]``;
    v ``[B, T, Hv, Dv]``; beta ``[B, T, Hv]``) and the flat ``[N, T, ...]`` chunk tensors
    (program ``n`` is batch ``n // Hv``, value head ``n % Hv``, key head ``(n % Hv) // rep``)."""

    def __init__(self, hk: int, hv: int, chunk: int):
        self.hv, self.rep, self.chunk = hv, hv // hk, chunk

    def heads(self, width: int, key_heads: bool = False) -> pl.BlockSpec:
        hv, rep = self.hv, self.rep

        def index(n, i):
            return (n // hv, i, (n % hv) // rep if key_heads else n % hv, 0)

        return pl.BlockSpec((None, self.chunk, None, width), index)

    def gate(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.chunk, None), lambda n, i: (n // self.hv, i, n % self.hv))

    def flat(self, width: int | None = None) -> pl.BlockSpec:
        if width is None:
            return pl.BlockSpec((None, self.chunk), lambda n, i: (n, i))
        return pl.BlockSpec((None, self.chunk, width), lambda n, i: (n, i, 0))

    def ids(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.chunk), lambda n, i: (n // self.hv, i))

    def inputs(self, dk: int, dv: int) -> list[pl.BlockSpec]:
        """Specs of ``(q, k, v, beta, gcum, rel)``."""
        return [
            self.heads(dk, True),
            self.heads(dk, True),
            self.heads(dv),
            self.gate(),
            self.flat(),
            self.ids(),
        ]


def _call(kernel, args, in_specs, out_shape, out_specs, grid, interpret, name, num_warps):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)


def prepare_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gcum: jax.Array,
    rel: jax.Array,
    *,
    chunk: int,
    scale: float,
    interpret: bool = False,
    num_warps: int = 4,
) -> tuple[jax.Array, ...]:
    """``(qg, p, w, u0, kd)`` of ``reference.chunk_tensors`` in v's dtype.

    q, k: ``[B, T, Hk, Dk]``; v: ``[B, T, Hv, Dv]``; beta: ``[B, T, Hv]`` fp32; gcum
    (``chunk_log_decays``): ``[B * Hv, T]`` fp32; rel (``chunk_ids``): ``[B, T]`` int32.
    Returns flat ``[B * Hv, T, width]`` tensors (p: rows of chunk i hold its ``[L, L]``).
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    check_shapes(chunk, dk, dv, interpret)
    lay = _Layout(hk, hv, chunk)
    widths = (dk, chunk, dk, dv, dk)
    return tuple(
        _call(
            functools.partial(_fwd_kernel, scale=scale, bs=min(chunk, _MAX_BLOCK)),
            (q, k, v, beta, gcum, rel),
            lay.inputs(dk, dv),
            [jax.ShapeDtypeStruct((b * hv, t, wd), v.dtype) for wd in widths],
            [lay.flat(wd) for wd in widths],
            (b * hv, t // chunk),
            interpret,
            "gated_delta_prepare_fwd",
            num_warps,
        )
    )


def prepare_bwd(
    inputs: tuple[jax.Array, ...],
    cotangents: tuple[jax.Array, ...],
    *,
    chunk: int,
    scale: float,
    interpret: bool = False,
    num_warps: int = 8,  # the backward keeps about twice the live blocks of the forward
) -> tuple[jax.Array, ...]:
    """Cotangents of ``prepare_fwd`` at ``inputs`` ``(q, k, v, beta, gcum, rel)`` for output
    cotangents ``(dqg, dp, dw, du0, dkd)``: ``(dq, dk)`` per value head ``[B, T, Hv, Dk]``
    (sum over the value heads of a key head for GQA), ``dv``, ``dbeta``, ``dgcum`` (all fp32)."""
    q, k, v, beta, gcum, rel = inputs
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    lay = _Layout(hk, hv, chunk)
    out_lay = _Layout(hv, hv, chunk)  # per value head
    return tuple(
        _call(
            functools.partial(_bwd_kernel, scale=scale, bs=min(chunk, _MAX_BLOCK)),
            (*inputs, *cotangents),
            lay.inputs(dk, dv) + [lay.flat(wd) for wd in (dk, chunk, dk, dv, dk)],
            [jax.ShapeDtypeStruct((b, t, hv, wd), F32) for wd in (dk, dk, dv)]
            + [jax.ShapeDtypeStruct((b, t, hv), F32), jax.ShapeDtypeStruct((b * hv, t), F32)],
            [out_lay.heads(dk), out_lay.heads(dk), out_lay.heads(dv), out_lay.gate(), out_lay.flat()],
            (b * hv, t // chunk),
            interpret,
            "gated_delta_prepare_bwd",
            num_warps,
        )
    )
