"""Pure-jnp causal depthwise conv + SiLU on padded inputs: the oracle and the forward of every
backend; optionally l2-normalised per head over the leading channels (the Gated DeltaNet's q, k)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

L2_EPS = 1e-6


class HeadNorm(NamedTuple):
    """l2-normalise the output per head of ``head_dim`` channels below channel ``end`` (an int,
    or an int32 scalar where it depends on the channel shard)."""

    head_dim: int
    end: int | jax.Array


def padded_segments(segment_ids: jax.Array, pad: int) -> jax.Array:
    """``[B, pad + T]``: ``pad`` copies of the first token's segment id (the context's), then
    ``segment_ids``."""
    return jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids], axis=1)


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def normalize_heads(y: jax.Array, norm: HeadNorm | None) -> jax.Array:
    """``y [..., C]`` (fp32) with the heads below ``norm.end`` l2-normalised (as is without)."""
    if norm is None:
        return y
    channels = y.shape[-1]
    heads = y.reshape(*y.shape[:-1], channels // norm.head_dim, norm.head_dim)
    starts = jnp.arange(0, channels, norm.head_dim)
    normalized = jnp.where((starts < norm.end)[:, None], l2_normalize(heads), heads)
    return normalized.reshape(y.shape)


def conv_silu(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
              padded_seg: jax.Array, block_size: int | None, norm: HeadNorm | None = None
              ) -> jax.Array:
    """``silu(sum_j weight[K-1-j] * tap_j(t))`` for outputs ``t < T``, fp32, in ``x``'s dtype.

    With ``norm``, the heads it names are l2-normalised (fp32) before the cast.

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
    return normalize_heads(jax.nn.silu(pre), norm).astype(padded_x.dtype)
