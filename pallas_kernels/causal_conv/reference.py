"""Pure-jnp causal depthwise conv + SiLU on padded inputs: the oracle and the forward of every
backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conv_silu(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
              padded_seg: jax.Array, block_size: int | None) -> jax.Array:
    """``silu(sum_j weight[K-1-j] * tap_j(t))`` for outputs ``t < T``, fp32, in ``x``'s dtype.

    ``padded_x [B, T + K - 1, C]``: the ``K - 1`` context inputs, then the inputs; ``padded_seg
    [B, T + K - 1]`` likewise (the context counts as the first token's document). Tap ``j`` of
    output ``t`` is ``padded_x[t + K - 1 - j]``, zero unless its segment id equals ``t``'s. With
    ``padded_clean`` (FLARE handoff), a tap that reaches before the start of ``t``'s block
    (``t % block_size < j``) reads ``padded_clean`` instead.
    """
    pad = weight.shape[0] - 1
    length = padded_x.shape[1] - pad
    own_seg = padded_seg[:, pad:]
    offset_in_block = None if padded_clean is None else jnp.arange(length) % block_size
    pre = jnp.zeros((padded_x.shape[0], length, padded_x.shape[2]), jnp.float32)
    for back in range(pad + 1):
        window = slice(pad - back, pad - back + length)
        tap = padded_x[:, window]
        if padded_clean is not None and back > 0:
            tap = jnp.where((offset_in_block < back)[None, :, None], padded_clean[:, window], tap)
        same_doc = (padded_seg[:, window] == own_seg)[..., None]
        pre = pre + jnp.where(same_doc, tap.astype(jnp.float32), 0.0) * weight[pad - back].astype(
            jnp.float32)
    return jax.nn.silu(pre).astype(padded_x.dtype)
