"""The decoding cache's conv window of the Gated DeltaNet (the conv itself: ``ops.causal_conv_silu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conv_window(x: jax.Array, segment_ids: jax.Array, context: jax.Array | None,
                kernel: int) -> jax.Array:
    """The last ``kernel - 1`` inputs after ``x``, zeroed where not in the last token's document."""
    batch, _, channels = x.shape
    pad = kernel - 1
    if context is None:
        context = jnp.zeros((batch, pad, channels), x.dtype)
    padded_x = jnp.concatenate([context.astype(x.dtype), x], axis=1)[:, -pad:]
    padded_seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids],
                                 axis=1)[:, -pad:]
    keep = (padded_seg == segment_ids[:, -1:])[..., None]
    return jnp.where(keep, padded_x, jnp.zeros_like(padded_x))
