"""Depthwise causal conv1d of the Gated DeltaNet, document-aware and with FLARE handoff."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                          context: jax.Array | None = None, clean: jax.Array | None = None,
                          block_size: int | None = None) -> jax.Array:
    """``out[t] = sum_k weight[K-1-k] * x[t-k]`` over taps of the same document, fp32 accumulation.

    Args:
      x: ``[B, T, C]`` conv inputs; ``weight``: ``[K, C]`` (``weight[K-1]`` multiplies ``x[t]``).
      segment_ids: ``[B, T]``; a tap in another document contributes nothing.
      context: ``[B, K-1, C]`` inputs preceding ``x[:, 0]`` (a decoding cache), taken to belong to
        ``x[:, 0]``'s document and already zeroed where they do not; zeros when None.
      clean, block_size: FLARE handoff. ``x`` is then the noisy stream of a row that starts on a block
        boundary, and taps that reach before the start of ``t``'s block read ``clean`` instead.
    """
    kernel = weight.shape[0]
    batch, length, channels = x.shape
    pad = kernel - 1
    if context is None:
        context = jnp.zeros((batch, pad, channels), x.dtype)
    padded_x = jnp.concatenate([context.astype(x.dtype), x], axis=1)
    padded_seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids], axis=1)
    if clean is not None:
        padded_clean = jnp.concatenate([jnp.zeros_like(context, x.dtype), clean], axis=1)
        offset_in_block = jnp.arange(length) % block_size
    out = jnp.zeros((batch, length, channels), jnp.float32)
    for back in range(kernel):
        window = slice(pad - back, pad - back + length)
        tap = padded_x[:, window]
        if clean is not None and back > 0:
            crosses_block = (offset_in_block < back)[None, :, None]
            tap = jnp.where(crosses_block, padded_clean[:, window], tap)
        same_doc = (padded_seg[:, window] == segment_ids)[..., None]
        out = out + jnp.where(same_doc, tap.astype(jnp.float32), 0.0) * weight[pad - back].astype(
            jnp.float32)
    return out.astype(x.dtype)


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
