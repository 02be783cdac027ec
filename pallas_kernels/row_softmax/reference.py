"""The oracle of the row-softmax kernel: XLA, offset by each row's max."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_softmax(x: jax.Array, exp_dtype: jnp.dtype | None
                ) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """``(exp(x - m) in exp_dtype or None, logsumexp [N], m [N])`` of ``x [N, V]`` in fp32, ``m``
    the row max."""
    x = x.astype(jnp.float32)
    m = jnp.max(x, axis=-1)
    ex = jnp.exp(x - m[:, None])
    lse = m + jnp.log(jnp.sum(ex, axis=-1))
    return (None if exp_dtype is None else ex.astype(exp_dtype)), lse, m
