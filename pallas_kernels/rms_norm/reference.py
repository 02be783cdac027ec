"""The oracle of the RMSNorm kernels, and their path off the GPU: Qwen3.5's norms in jnp (fp32
inside), differentiated by autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, gate: jax.Array | None = None, *, eps: float,
             unit_offset: bool) -> jax.Array:
    """``x / rms(x) * scale`` over the last axis, in ``x``'s dtype; ``scale`` is ``1 + weight``
    with ``unit_offset``, else ``weight``. With ``gate`` (shaped like ``x``) the result is also
    multiplied by ``silu(gate)``, after ``x / rms(x)`` is rounded to ``x``'s dtype (HF's
    Qwen3.5 gated RMSNorm)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    if unit_offset:
        scale = 1.0 + scale
    if gate is None:
        return (normed * scale).astype(x.dtype)
    normed = normed.astype(x.dtype)
    return (scale * normed * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
