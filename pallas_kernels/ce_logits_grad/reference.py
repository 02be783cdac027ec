"""The oracle of the cross-entropy logits-gradient kernel, in XLA: fp32 math, one rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ce_logits_grad(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array,
                   out_dtype: jnp.dtype) -> jax.Array:
    """``weights[:, None] * (exp(logits - lse[:, None]) - onehot(targets))`` of ``logits [N, V]``
    (any float dtype, read as fp32), rounded once to ``out_dtype``."""
    ids = jnp.arange(logits.shape[1])
    p = jnp.exp(logits.astype(jnp.float32) - lse[:, None])
    return (weights[:, None] * (p - (ids == targets[:, None]))).astype(out_dtype)
