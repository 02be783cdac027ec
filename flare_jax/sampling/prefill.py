"""The causal prefill every decoding mode starts with."""

from __future__ import annotations

import jax

from flare_jax.model.cache import DecodeCache, init_cache
from flare_jax.model.hybrid import HybridLM


def prefill(model: HybridLM, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
            cache_length: int) -> tuple[jax.Array, DecodeCache]:
    """Run the left-padded prompts into a fresh cache; returns the last position's logits
    ``[B, V]`` (the causal prediction of the first new token) and the cache."""
    cache = init_cache(model.config, tokens.shape[0], cache_length, model.dtype)
    logits, cache = model(tokens, segment_ids, positions, cache)
    return logits[:, -1], cache


def first_eos(tokens: jax.Array, eos_ids: jax.Array, limit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ``tokens [B, n]``: whether a stop token occurs among the first ``limit [B]``
    tokens, and how many tokens to keep (up to and including that stop token, else ``limit``)."""
    index = jax.numpy.arange(tokens.shape[1])[None, :]
    is_eos = jax.numpy.isin(tokens, eos_ids) & (index < limit[:, None])
    found = jax.numpy.any(is_eos, axis=1)
    keep = jax.numpy.where(found, jax.numpy.argmax(is_eos, axis=1) + 1, limit)
    return found, keep
