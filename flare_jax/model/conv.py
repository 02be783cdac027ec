"""The decoding cache's conv window of the Gated DeltaNet (the conv itself: ``ops.causal_conv_silu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv.api import pad_inputs


def conv_window(x: jax.Array, segment_ids: jax.Array, context: jax.Array | None,
                kernel: int) -> jax.Array:
    """The last ``kernel - 1`` inputs after ``x``, zeroed where not in the last token's document."""
    pad = kernel - 1
    padded_x, _, padded_seg = pad_inputs(x, segment_ids, kernel, context=context)
    window, window_seg = padded_x[:, -pad:], padded_seg[:, -pad:]
    keep = (window_seg == segment_ids[:, -1:])[..., None]
    return jnp.where(keep, window, jnp.zeros_like(window))
