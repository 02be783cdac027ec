"""Per-chunk math of the sequential scan, shared by the GPU and TPU kernels (values, not refs).

Forward, for the ``[Dk, BV]`` column block ``s`` of the state entering a chunk::

    u = u0 - w s;   o = qg s + p u;   s_next = gam s + kd^T u

Backward, with ``d`` the cotangent of ``s_next`` (``dh``: an external cotangent of ``s``)::

    du = p^T do + kd d;   d_prev = gam d - w^T du + qg^T do (+ dh)

The output half (``out_step`` / ``out_bwd``) is also what a second stream that only reads the
state needs (the FLARE handoff's noisy block of one chunk: ``kd d`` and ``gam`` drop out).

With ``q_scale`` / ``k_scale`` (``[L]`` fp32, the GPU kernels) the ``qg`` / ``kd`` arguments are
the unscaled ``q`` / ``k`` and ``qg = diag(q_scale) q``, ``kd = diag(k_scale) k`` are applied to
the ``[L, BV]`` side of each product instead (``qg s = diag(q_scale) (q s)``,
``kd^T u = k^T (diag(k_scale) u)``), so that neither is ever written to memory.

Matmul operands are cast to the chunk tensors' dtype (bf16 on the fast path); accumulation and
the carried state stay fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _mm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False) -> jax.Array:
    """``a @ b`` (or ``a^T @ b``) with fp32 accumulation; fp32 operands stay IEEE fp32 (the
    default precision would let Triton use TF32), bf16 operands use the bf16 tensor cores."""
    dims = (((0 if transpose_a else 1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)


def check_noisy(ct: tuple, noisy: tuple) -> None:
    """A noisy stream (the output half of the operands is read) must have the clean stream's
    chunk layout; ``ct``, ``noisy``: NamedTuples of the same type."""
    for name, a, b in zip(ct._fields[:4], ct, noisy, strict=False):
        if a.shape != b.shape:
            raise ValueError(f"noisy {name} {b.shape} does not match the clean stream's {a.shape}")


def _rows(scale: jax.Array | None, x: jax.Array) -> jax.Array:
    """``diag(scale) x`` (fp32), or ``x`` without a scale."""
    return x if scale is None else scale[:, None] * x.astype(F32)


def out_step(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    u0: jax.Array,
    s_c: jax.Array,
    q_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Output of one chunk from the state ``s_c`` (already in the chunk tensors' dtype): returns
    ``(o, u)``, ``o`` and the corrected values ``u`` fp32."""
    u = u0.astype(F32) - _mm(w, s_c)
    return _rows(q_scale, _mm(qg, s_c)) + _mm(p, u.astype(w.dtype)), u


def fwd_step(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    u0: jax.Array,
    kd: jax.Array,
    gam: jax.Array,
    s: jax.Array,
    q_scale: jax.Array | None = None,
    k_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One chunk forward: returns ``(o, s_next)`` (both fp32)."""
    o, u = out_step(qg, p, w, u0, s.astype(w.dtype), q_scale)
    return o, gam * s + _mm(kd, _rows(k_scale, u).astype(w.dtype), transpose_a=True)


def out_bwd(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    do: jax.Array,
    du_carry: jax.Array | None = None,
    q_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Backward of ``out_step`` for ``do`` (``du_carry``: the state path's share of ``du``):
    returns ``(du, ds)``, the cotangents of ``u0`` and of the state (both fp32)."""
    dt = w.dtype
    du = _mm(p, do.astype(dt), transpose_a=True)
    du = du if du_carry is None else du + du_carry
    do_q = _rows(q_scale, do).astype(dt)
    return du, _mm(qg, do_q, transpose_a=True) - _mm(w, du.astype(dt), transpose_a=True)


def bwd_step(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    kd: jax.Array,
    gam: jax.Array,
    do: jax.Array,
    d: jax.Array,
    dh: jax.Array | None = None,
    q_scale: jax.Array | None = None,
    k_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One chunk backward: returns ``(du, d_prev)`` (both fp32)."""
    du, ds = out_bwd(qg, p, w, do, _rows(k_scale, _mm(kd, d.astype(w.dtype))), q_scale)
    d_prev = gam * d + ds
    return du, d_prev if dh is None else d_prev + dh
