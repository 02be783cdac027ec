"""Pallas GPU (Triton lowering) kernels for the per-chunk preparation of the chunked form + VJP.

Split like fla's chunked kernels, every kernel on grid ``(N, NT)`` (N = batch * value heads, one
program per chunk) and every matmul but the inverse's a whole-chunk tile:

1. ``kkt``: decays, ``A = beta (k k^T) * D`` (strictly lower, fp32 to HBM) and ``p`` of
   ``reference.chunk_tensors`` (one ``[L, Dk] x [Dk, L]`` dot each). ``qg`` and ``kd`` are not
   written: they are row scales of q and k (``reference.row_scales``), which the scan applies
   to what it reads (``gpu.ScanOperands``).
2. ``solve``: ``T = (I + A)^-1`` from 16 x 16 blocks of ``A`` (diagonal blocks by nilpotent
   doubling, off-diagonal blocks by block forward substitution), fp32 dots, stored whole in the
   compute dtype.
3. ``wy``: ``w = T (beta c e^G k)``, ``u0 = T (beta v)``, one ``[L, L] x [L, D]`` dot each.

Backward (one kernel; ``T``, ``w``, ``u0`` are residuals of the forward; cotangents
``dqg, dp, dw, du0, dkd``: those of every chunk tensor, ``qg`` and ``kd`` included although the
forward never forms them), with ``Y_u = beta v``, ``Y_w = beta c e^G k``::

    dY = T^T d(u0 | w);   dA = -tril(dY_u u0^T + dY_w w^T, -1)   (as dA = -T^T dT T^T)

then the chain rule through ``A``, ``p``, ``qg``, ``kd`` to q, k, v, beta and ``G``, all as
whole-chunk dots. Matmul operands are in the inputs' dtype (bf16 on the fast path) with fp32
accumulation; the inverse, decays and gates are fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta.gpu import check_shapes

F32 = jnp.float32
_MAX_BLOCK = 16


IEEE = jax.lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False, dtype=None, precision=IEEE):
    """``a @ b`` (``ta``/``tb``: transpose a/b) with operands cast to ``dtype`` (default: a's),
    fp32 accumulation; fp32 operands stay IEEE fp32 unless ``precision`` says otherwise."""
    dtype = a.dtype if dtype is None else dtype
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), dims, precision=precision, preferred_element_type=F32
    )


class _InversePrecision(NamedTuple):
    """Precision of the inverse's fp32 16 x 16 products: IEEE fp32 (FMA loops, no tensor cores)
    where ``T`` is stored in fp32; where it is stored in bf16, the tensor cores: 3xTF32 (about
    fp32 accuracy) for the diagonal blocks' nilpotent powers, whose terms can grow large before
    they cancel (``C(15, 7) a^8`` for keys that repeat), and TF32 for the block substitution,
    products of inverse blocks of moderate size (as fla's ``solve_tril``)."""

    powers: object = IEEE
    blocks: object = IEEE

    @classmethod
    def for_output(cls, dtype: jnp.dtype, interpret: bool) -> _InversePrecision:
        """IEEE for fp32 ``T`` and in interpret mode (the CPU has no 3xTF32 dot)."""
        if dtype == F32 or interpret:
            return cls()
        return cls(jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3, jax.lax.Precision.DEFAULT)


def _iota(n: int, axis: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n, n), axis)


def _decay(same: jax.Array, diff: jax.Array) -> jax.Array:
    """``exp(diff)`` where ``same`` (the same run, causal), else 0 (never exp of a masked value)."""
    return jnp.where(same, jnp.exp(jnp.where(same, diff, 0.0)), 0.0)


def _diag_inverse(a: jax.Array, precision=IEEE) -> jax.Array:
    """``(I + a)^-1`` of a strictly lower ``[bs, bs]`` block: ``(I - a)(I + a^2)(I + a^4)...``
    (``a`` is nilpotent, ``a^bs = 0``)."""
    bs = a.shape[0]
    n = -a
    x = (_iota(bs, 0) == _iota(bs, 1)).astype(F32) + n
    power = 2
    while power < bs:
        n = dot(n, n, precision=precision)
        x = x + dot(x, n, precision=precision)
        power *= 2
    return x


class _Gates(NamedTuple):
    """Per-chunk gates and decays (fp32) read from the ``beta``, ``gcum``, ``rel`` refs."""

    beta: jax.Array  # [L]
    e: jax.Array  # [L] c exp(G)
    decay: jax.Array  # [L, L] D (same run, j <= i)
    dl: jax.Array  # [L] D[L - 1, :], decay from each token to the chunk's end
    last: jax.Array  # [L] bool, the chunk's last token

    @classmethod
    def load(cls, beta_ref, g_ref, rel_ref) -> _Gates:
        g, r = g_ref[...].astype(F32), rel_ref[...]
        chunk = g.shape[0]
        same = (r[:, None] == r[None, :]) & (_iota(chunk, 0) >= _iota(chunk, 1))
        last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
        g_last, r_last = jnp.sum(jnp.where(last, g, 0.0)), jnp.sum(jnp.where(last, r, 0))
        return cls(
            beta=beta_ref[...].astype(F32),
            e=jnp.where(r == 0, jnp.exp(g), 0.0),
            decay=_decay(same, g[:, None] - g[None, :]),
            dl=_decay(r == r_last, g_last - g),
            last=last,
        )


def _strict(chunk: int) -> jax.Array:
    return _iota(chunk, 0) > _iota(chunk, 1)


def _kkt_kernel(q, k, beta, g, rel, a, p, *, scale: float):
    gt = _Gates.load(beta, g, rel)
    k_all = k[...]
    kk = dot(k_all, k_all, tb=True)
    a[...] = jnp.where(_strict(k.shape[0]), gt.beta[:, None] * kk * gt.decay, 0.0)
    p[...] = (scale * dot(q[...], k_all, tb=True) * gt.decay).astype(p.dtype)


def _solve_kernel(a, t, *, bs: int, precision: _InversePrecision):
    nb = a.shape[0] // bs

    def at(i: int, j: int) -> tuple[pl.Slice, pl.Slice]:
        return pl.ds(i * bs, bs), pl.ds(j * bs, bs)

    blocks = {}
    for i in range(nb):
        blocks[i, i] = _diag_inverse(a[at(i, i)], precision.powers)
        for j in range(i):
            acc = sum(dot(a[at(i, m)], blocks[m, j], precision=precision.blocks) for m in range(j, i))
            blocks[i, j] = -dot(blocks[i, i], acc, precision=precision.blocks)
    zero = jnp.zeros((bs, bs), t.dtype)
    for i in range(nb):
        for j in range(nb):
            t[at(i, j)] = blocks[i, j].astype(t.dtype) if j <= i else zero


def _wy_kernel(t, k, v, beta, g, rel, w, u0):
    gt = _Gates.load(beta, g, rel)
    t_all = t[...]
    w[...] = dot(t_all, (gt.beta * gt.e)[:, None] * k[...].astype(F32)).astype(w.dtype)
    u0[...] = dot(t_all, gt.beta[:, None] * v[...].astype(F32)).astype(u0.dtype)


def _bwd_kernel(q, k, v, beta, g, rel, t, w, u0, dqg, dp, dw, du0, dkd, *outs, scale: float):
    dq, dk, dv, dbeta, dg = outs
    gt = _Gates.load(beta, g, rel)
    dt = k.dtype
    q_all, k_all, t_all = q[...], k[...], t[...]
    q32, k32, v32 = q_all.astype(F32), k_all.astype(F32), v[...].astype(F32)
    dqg_, dkd_ = dqg[...].astype(F32), dkd[...].astype(F32)
    dyu = dot(t_all, du0[...], ta=True, dtype=dt)
    dyw = dot(t_all, dw[...], ta=True, dtype=dt)
    da = dot(dyu, u0[...], tb=True, dtype=dt) + dot(dyw, w[...], tb=True, dtype=dt)
    da = jnp.where(_strict(k.shape[0]), -da, 0.0) * gt.decay  # dA * D
    dkk = gt.beta[:, None] * da  # cotangent of k k^T
    ds = scale * dp[...].astype(F32) * gt.decay  # cotangent of q k^T
    kk, qk = dot(k_all, k_all, tb=True), dot(q_all, k_all, tb=True)
    dd = dkk * kk + ds * qk  # cotangent of D, times D
    kyw = jnp.sum(k32 * dyw, axis=1)
    ddl = jnp.sum(k32 * dkd_, axis=1) * gt.dl
    de = gt.beta * kyw + scale * jnp.sum(q32 * dqg_, axis=1)
    # G_L enters every entry of D's last row: its cotangent lands on the chunk's last token.
    dg_ = jnp.sum(dd, axis=1) - jnp.sum(dd, axis=0) + de * gt.e - ddl
    dg[...] = dg_ + jnp.where(gt.last, jnp.sum(ddl), 0.0)
    dbeta[...] = jnp.sum(da * kk, axis=1) + jnp.sum(v32 * dyu, axis=1) + gt.e * kyw
    dq[...] = (scale * gt.e[:, None] * dqg_ + dot(ds, k_all, dtype=dt)).astype(dq.dtype)
    dk_ = gt.dl[:, None] * dkd_ + (gt.beta * gt.e)[:, None] * dyw
    dk_ += dot(dkk, k_all, dtype=dt) + dot(dkk, k_all, ta=True, dtype=dt)
    dk[...] = (dk_ + dot(ds, q_all, ta=True, dtype=dt)).astype(dk.dtype)
    dv[...] = (gt.beta[:, None] * dyu).astype(dv.dtype)


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

    def gates(self) -> list[pl.BlockSpec]:
        """Specs of ``(beta, gcum, rel)``."""
        ids = pl.BlockSpec((None, self.chunk), lambda n, i: (n // self.hv, i))
        return [self.gate(), self.flat(), ids]


class PrepWarps(NamedTuple):
    """``num_warps`` of the preparation kernels (the benchmark sweeps them)."""

    kkt: int = 4
    solve: int = 2  # H100, 8 x 4096 x 16 x 128: 2 warps 0.36 ms, 4 warps 0.40, 8 warps 0.56
    wy: int = 4
    bwd: int = 4  # H100, same shape: 4 warps 3.17 ms, 8 warps 4.70


DEFAULT_WARPS = PrepWarps()


def _call(kernel, args, in_specs, outs, grid, interpret, name, num_warps):
    """``outs``: ``(ShapeDtypeStruct, BlockSpec)`` pairs."""
    return pl.pallas_call(
        kernel,
        out_shape=[o[0] for o in outs],
        grid=grid,
        in_specs=in_specs,
        out_specs=[o[1] for o in outs],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)


class _Spec:
    """Shapes and block specs shared by the preparation kernels of one call."""

    def __init__(self, q: jax.Array, v: jax.Array, chunk: int, interpret: bool):
        b, self.t, hk, self.dk = q.shape
        hv, self.dv = v.shape[2:]
        check_shapes(chunk, self.dk, self.dv, interpret)
        self.lay, self.n, self.dt = _Layout(hk, hv, chunk), b * hv, v.dtype
        self.grid = (b * hv, self.t // chunk)

    def out(self, width: int, dtype: jnp.dtype | None = None) -> tuple[jax.ShapeDtypeStruct, pl.BlockSpec]:
        """A flat ``[N, T, width]`` output (compute dtype unless ``dtype``)."""
        shape = jax.ShapeDtypeStruct((self.n, self.t, width), dtype or self.dt)
        return shape, self.lay.flat(width)


def kkt(
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
    num_warps: int = DEFAULT_WARPS.kkt,
) -> tuple[jax.Array, ...]:
    """Kernel 1: ``(A, p)``; ``A`` strictly lower fp32, ``p`` in v's dtype (v only sets the dtype
    and head count). Arguments as in ``prepare_fwd``."""
    sp = _Spec(q, v, chunk, interpret)
    heads = sp.lay.heads(sp.dk, True)
    return _call(
        functools.partial(_kkt_kernel, scale=scale),
        (q, k, beta, gcum, rel),
        [heads, heads, *sp.lay.gates()],
        [sp.out(chunk, F32), sp.out(chunk)],
        sp.grid, interpret, "gated_delta_prepare_kkt", num_warps,
    )  # fmt: skip


def solve(
    a: jax.Array,
    *,
    chunk: int,
    dtype: jnp.dtype,
    interpret: bool = False,
    num_warps: int = DEFAULT_WARPS.solve,
) -> jax.Array:
    """Kernel 2: ``T = (I + A)^-1`` per chunk of ``a [N, T, L]`` (fp32), returned in ``dtype``
    (which sets the precision of its products, ``_InversePrecision``)."""
    lay = _Layout(1, 1, chunk)
    (t_inv,) = _call(
        functools.partial(
            _solve_kernel, bs=min(chunk, _MAX_BLOCK), precision=_InversePrecision.for_output(dtype, interpret)
        ),
        (a,),
        [lay.flat(chunk)],
        [(jax.ShapeDtypeStruct(a.shape, dtype), lay.flat(chunk))],
        (a.shape[0], a.shape[1] // chunk), interpret, "gated_delta_prepare_solve", num_warps,
    )  # fmt: skip
    return t_inv


def wy(
    t_inv: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gcum: jax.Array,
    rel: jax.Array,
    *,
    chunk: int,
    interpret: bool = False,
    num_warps: int = DEFAULT_WARPS.wy,
) -> tuple[jax.Array, ...]:
    """Kernel 3: ``(w, u0)`` in v's dtype from ``T`` (q only sets the head counts)."""
    sp = _Spec(q, v, chunk, interpret)
    return _call(
        _wy_kernel,
        (t_inv, k, v, beta, gcum, rel),
        [sp.lay.flat(chunk), sp.lay.heads(sp.dk, True), sp.lay.heads(sp.dv), *sp.lay.gates()],
        [sp.out(sp.dk), sp.out(sp.dv)],
        sp.grid, interpret, "gated_delta_prepare_wy", num_warps,
    )  # fmt: skip


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
    warps: PrepWarps = DEFAULT_WARPS,
) -> tuple[jax.Array, ...]:
    """``(p, w, u0)`` of ``reference.chunk_tensors`` in v's dtype, then ``T = (I + A)^-1``.

    q, k: ``[B, T, Hk, Dk]``; v: ``[B, T, Hv, Dv]``; beta: ``[B, T, Hv]`` fp32; gcum
    (``chunk_log_decays``): ``[B * Hv, T]`` fp32; rel (``chunk_ids``): ``[B, T]`` int32.
    Returns flat ``[B * Hv, T, width]`` tensors (p, T: rows of chunk i hold its ``[L, L]``).
    """
    inputs = (q, k, v, beta, gcum, rel)
    kw = dict(chunk=chunk, interpret=interpret)
    a, p = kkt(*inputs, scale=scale, num_warps=warps.kkt, **kw)
    t_inv = solve(a, dtype=v.dtype, num_warps=warps.solve, **kw)
    w, u0 = wy(t_inv, *inputs, num_warps=warps.wy, **kw)
    return p, w, u0, t_inv


def prepare_bwd(
    inputs: tuple[jax.Array, ...],
    residuals: tuple[jax.Array, ...],
    cotangents: tuple[jax.Array, ...],
    *,
    chunk: int,
    scale: float,
    interpret: bool = False,
    num_warps: int = DEFAULT_WARPS.bwd,
) -> tuple[jax.Array, ...]:
    """Cotangents of ``prepare_fwd`` at ``inputs`` ``(q, k, v, beta, gcum, rel)`` with its
    ``residuals`` ``(T, w, u0)`` for output cotangents ``(dqg, dp, dw, du0, dkd)``: ``(dq, dk)``
    per value head ``[B, T, Hv, Dk]`` (fp32 for GQA, whose caller sums the value heads of a key
    head; else in q's dtype), ``dv`` in v's dtype, ``dbeta`` and ``dgcum`` fp32."""
    q, k, v, *gates = inputs
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    dqk_dtype = q.dtype if hv == hk else F32
    lay = _Layout(hk, hv, chunk)
    out_lay = _Layout(hv, hv, chunk)  # per value head
    flat = [lay.flat(wd) for wd in (chunk, dk, dv, dk, chunk, dk, dv, dk)]
    return tuple(
        _call(
            functools.partial(_bwd_kernel, scale=scale),
            (q, k, v, *gates, *residuals, *cotangents),
            [lay.heads(dk, True), lay.heads(dk, True), lay.heads(dv), *lay.gates(), *flat],
            [
                (jax.ShapeDtypeStruct((b, t, hv, dk), dqk_dtype), out_lay.heads(dk)),
                (jax.ShapeDtypeStruct((b, t, hv, dk), dqk_dtype), out_lay.heads(dk)),
                (jax.ShapeDtypeStruct((b, t, hv, dv), v.dtype), out_lay.heads(dv)),
                (jax.ShapeDtypeStruct((b, t, hv), F32), out_lay.gate()),
                (jax.ShapeDtypeStruct((b * hv, t), F32), out_lay.flat()),
            ],
            (b * hv, t // chunk),
            interpret,
            "gated_delta_prepare_bwd",
            num_warps,
        )
    )
