"""Diffusion decoding: block after block, denoise a block of mask tokens in parallel against the
read-only cache, then one causal pass over the finished block writes it into the cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.model.cache import write_rows
from flare_jax.sampling.batch import PROMPT_SEGMENT
from flare_jax.sampling.denoising import DenoiseSchedule, denoise_block
from flare_jax.sampling.prefill import first_eos, prefill
from flare_jax.sampling.token_selection import SamplingParams


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "params", "schedule",
                                             "mask_id", "cache_length"))
def generate_diffusion(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                       segment_ids: jax.Array, positions: jax.Array, lengths: jax.Array,
                       eos_ids: jax.Array, threshold: jax.Array, rng: jax.Array, *,
                       max_new_tokens: int, params: SamplingParams, schedule: DenoiseSchedule,
                       mask_id: int, cache_length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(new_tokens [B, n_blocks * bs], num_new [B], forward_passes [B])``."""
    model = nnx.merge(graphdef, state)
    batch, size = tokens.shape[0], schedule.block_size
    num_blocks = -(-max_new_tokens // size)
    last_logits, cache = prefill(model, tokens, segment_ids, positions, cache_length)
    segment = jnp.full((batch, size), PROMPT_SEGMENT, jnp.int32)

    def cond(carry):
        return (carry[0] < num_blocks) & ~jnp.all(carry[4])

    def body(carry):
        block_index, cache, last_logits, out, done, num_new, forwards, rng = carry
        rng, block_rng = jax.random.split(rng)
        block_positions = (lengths + block_index * size)[:, None] + jnp.arange(size)[None, :]
        block = jnp.full((batch, size), mask_id, jnp.int32)
        masked = jnp.broadcast_to(~done[:, None], (batch, size))
        block, steps = denoise_block(model, cache, block, masked, block_positions, last_logits,
                                     threshold, schedule, params, block_rng)
        logits, cache = model(block, segment, block_positions, cache)
        found, keep = first_eos(block, eos_ids, jnp.minimum(size, max_new_tokens - num_new))
        out = jnp.where(done[:, None], out, write_rows(out, block, num_new))
        num_new = jnp.where(done, num_new, num_new + keep)
        forwards = jnp.where(done, forwards, forwards + steps + 1)
        done = done | found | (num_new >= max_new_tokens)
        return block_index + 1, cache, logits[:, -1], out, done, num_new, forwards, rng

    out = jnp.zeros((batch, num_blocks * size), jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (jnp.int32(0), cache, last_logits, out, jnp.zeros((batch,), bool), zeros, zeros + 1, rng)
    _, _, _, out, _, num_new, forwards, _ = jax.lax.while_loop(cond, body, carry)
    return out, num_new, forwards
