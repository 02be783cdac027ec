"""Static-batch generation: prefill, then rounds in one jit-compiled ``while_loop`` until every row
has hit a stop token or its token budget."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.model.cache import write_rows
from flare_jax.sampling.prefill import first_eos
from flare_jax.sampling.rounds import DecodeSettings, decode_round, start


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "max_new_tokens",
                                             "cache_length"))
def generate_batch(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                   segment_ids: jax.Array, positions: jax.Array, lengths: jax.Array,
                   stop_ids: jax.Array, threshold: jax.Array, rng: jax.Array, *,
                   settings: DecodeSettings, max_new_tokens: int, cache_length: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode a left-padded prompt batch. Returns ``(tokens [B, max_new + R], num_new [B],
    forward_passes [B])``; a row's tokens end at its first stop token (kept) or at the budget."""
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    rng, start_rng = jax.random.split(rng)
    last_logits, cache, draft = start(model, tokens, segment_ids, positions, cache_length,
                                      start_rng, settings)

    def cond(carry):
        return ~jnp.all(carry[4])

    def body(carry):
        cache, last_logits, draft, out, done, num_new, passes, rng = carry
        rng, round_rng = jax.random.split(rng)
        step = decode_round(model, cache, last_logits, draft, lengths + num_new, ~done, threshold,
                            round_rng, settings)
        found, keep = first_eos(step.tokens, stop_ids,
                                jnp.minimum(step.count, max_new_tokens - num_new))
        out = jnp.where(done[:, None], out, write_rows(out, step.tokens, num_new))
        passes = jnp.where(done, passes, passes + step.passes)
        num_new = jnp.where(done, num_new, num_new + keep)
        done = done | found | (num_new >= max_new_tokens)
        return step.cache, step.last_logits, step.draft, out, done, num_new, passes, rng

    out = jnp.zeros((batch, max_new_tokens + settings.tokens_per_round), jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (cache, last_logits, draft, out, jnp.zeros((batch,), bool), zeros, zeros + 1, rng)
    _, _, _, out, _, num_new, passes, _ = jax.lax.while_loop(cond, body, carry)
    return out, num_new, passes
