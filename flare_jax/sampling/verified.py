"""Verified decoding: a diffusion draft of each block is checked by one causal pass; the longest
prefix equal to the causal model's own choices is kept (the first token is always the causal
model's), and the caches are cut back to end exactly after it. Greedy output equals AR mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.model.cache import write_rows
from flare_jax.sampling.batch import PROMPT_SEGMENT
from flare_jax.sampling.denoising import DenoiseSchedule, denoise_block
from flare_jax.sampling.prefill import first_eos, prefill
from flare_jax.sampling.token_selection import SamplingParams, select_tokens


def accepted_length(draft: jax.Array, causal: jax.Array) -> jax.Array:
    """``1 +`` the longest run of ``draft[:, i + 1] == causal[:, i]`` (``draft[:, 0]`` is the
    causal model's own token, so at least one token is always kept)."""
    match = (draft[:, 1:] == causal[:, :-1]).astype(jnp.int32)
    return 1 + jnp.sum(jnp.cumprod(match, axis=1), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "params", "schedule",
                                             "mask_id", "cache_length"))
def generate_verified(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                      segment_ids: jax.Array, positions: jax.Array, lengths: jax.Array,
                      eos_ids: jax.Array, threshold: jax.Array, rng: jax.Array, *,
                      max_new_tokens: int, params: SamplingParams, schedule: DenoiseSchedule,
                      mask_id: int, cache_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(new_tokens [B, max_new_tokens + bs], num_new [B], forward_passes [B])``."""
    model = nnx.merge(graphdef, state)
    batch, size = tokens.shape[0], schedule.block_size
    last_logits, cache = prefill(model, tokens, segment_ids, positions, cache_length)
    segment = jnp.full((batch, size), PROMPT_SEGMENT, jnp.int32)
    not_first = jnp.arange(size)[None, :] > 0

    def cond(carry):
        return ~jnp.all(carry[3])

    def body(carry):
        cache, last_logits, out, done, num_new, forwards, rng = carry
        rng, first_rng, draft_rng, check_rng = jax.random.split(rng, 4)
        block_positions = (lengths + num_new)[:, None] + jnp.arange(size)[None, :]
        first = select_tokens(last_logits, params, first_rng)
        draft = jnp.full((batch, size), mask_id, jnp.int32).at[:, 0].set(first)
        draft, steps = denoise_block(model, cache, draft, not_first & ~done[:, None],
                                     block_positions, last_logits, threshold, schedule, params,
                                     draft_rng)
        logits, full_cache, pending = model.append(draft, segment, block_positions, cache)
        causal = select_tokens(logits, params, check_rng)
        keep = jnp.minimum(accepted_length(draft, causal), max_new_tokens - num_new)
        found, keep = first_eos(draft, eos_ids, keep)
        keep = jnp.where(done, 0, keep)
        cache = model.keep_prefix(full_cache, pending, keep)
        last = jnp.take_along_axis(logits, jnp.maximum(keep - 1, 0)[:, None, None], axis=1)[:, 0]
        last_logits = jnp.where((keep > 0)[:, None], last, last_logits)
        out = jnp.where(done[:, None], out, write_rows(out, draft, num_new))
        forwards = jnp.where(done, forwards, forwards + steps + 1)
        num_new = num_new + keep
        done = done | found | (num_new >= max_new_tokens)
        return cache, last_logits, out, done, num_new, forwards, rng

    out = jnp.zeros((batch, max_new_tokens + size), jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (cache, last_logits, out, jnp.zeros((batch,), bool), zeros, zeros + 1, rng)
    _, _, out, _, num_new, forwards, _ = jax.lax.while_loop(cond, body, carry)
    return out, num_new, forwards
