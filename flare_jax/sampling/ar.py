"""Autoregressive decoding: causal prefill, then one jit-compiled loop of single-token steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.sampling.batch import PROMPT_SEGMENT
from flare_jax.sampling.prefill import prefill
from flare_jax.sampling.token_selection import SamplingParams, select_tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "params", "cache_length"))
def generate_ar(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, segment_ids: jax.Array,
                positions: jax.Array, lengths: jax.Array, eos_ids: jax.Array, rng: jax.Array, *,
                max_new_tokens: int, params: SamplingParams, cache_length: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode up to ``max_new_tokens`` per row of a left-padded prompt batch.

    Returns ``(new_tokens [B, max_new_tokens], num_new [B], forward_passes [B])``: tokens after a
    row's first stop token are padding; ``num_new`` counts tokens up to and including it.
    """
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    logits, cache = prefill(model, tokens, segment_ids, positions, cache_length)
    rng, step_rng = jax.random.split(rng)
    first = select_tokens(logits, params, step_rng)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)
    num_new = jnp.ones((batch,), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, last, out, done, num_new, rng = carry
        segment = jnp.full((batch, 1), PROMPT_SEGMENT, jnp.int32)
        position = (lengths + step - 1)[:, None]
        logits, cache = model(last[:, None], segment, position, cache)
        rng, step_rng = jax.random.split(rng)
        token = select_tokens(logits[:, -1], params, step_rng)
        out = out.at[:, step].set(jnp.where(done, 0, token))
        num_new = num_new + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        return step + 1, cache, token, out, done, num_new, rng

    carry = (jnp.int32(1), cache, first, out, done, num_new, rng)
    _, _, _, out, _, num_new, _ = jax.lax.while_loop(cond, body, carry)
    return out, num_new, num_new
