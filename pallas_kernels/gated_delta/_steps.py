"""Per-chunk math of the sequential scan, shared by the GPU and TPU kernels (values, not refs).

Forward, for the ``[Dk, BV]`` column block ``s`` of the state entering a chunk::

    u = u0 - w s;   o = qg s + p u;   s_next = gam s + kd^T u

Backward, with ``d`` the cotangent of ``s_next`` (``dh``: an external cotangent of ``s``)::

    du = p^T do + kd d;   d_prev = gam d - w^T du + qg^T do (+ dh)

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


def fwd_step(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    u0: jax.Array,
    kd: jax.Array,
    gam: jax.Array,
    s: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One chunk forward: returns ``(o, s_next)`` (both fp32)."""
    dt = w.dtype
    s_c = s.astype(dt)
    u = u0.astype(F32) - _mm(w, s_c)
    u_c = u.astype(dt)
    o = _mm(qg, s_c) + _mm(p, u_c)
    return o, gam * s + _mm(kd, u_c, transpose_a=True)


def bwd_step(
    qg: jax.Array,
    p: jax.Array,
    w: jax.Array,
    kd: jax.Array,
    gam: jax.Array,
    do: jax.Array,
    d: jax.Array,
    dh: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One chunk backward: returns ``(du, d_prev)`` (both fp32)."""
    dt = w.dtype
    do_c = do.astype(dt)
    du = _mm(p, do_c, transpose_a=True) + _mm(kd, d.astype(dt))
    d_prev = gam * d - _mm(w, du.astype(dt), transpose_a=True) + _mm(qg, do_c, transpose_a=True)
    return du, d_prev if dh is None else d_prev + dh
