"""One decoding round per mode, over every row of a batch of independent requests.

A round reads the cache, ``last_logits`` (the causal prediction of each row's next token) and a
:class:`Draft` (diffusion: the first denoising step of the next block) and returns up to ``R`` new
tokens per row: AR one token, diffusion one block, verified one checked draft. Every mode keeps
the same state, so one loop (static batches) and one engine (slots refilled from a queue) drive
all three.

Diffusion fuses each block's causal commit with the first denoising step of the next block: one
pass over ``[block k clean ; block k + 1 all masks]`` (:meth:`HybridLM.append_then_denoise`), so a
block of ``s`` denoising steps costs ``s`` passes, not ``s + 1``; the prefill makes the first
block's first step the same way (:func:`start`). The tokens are those of denoising each block
against the committed cache and then appending it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flare_jax.model.cache import DecodeCache, init_cache
from flare_jax.model.hybrid import HybridLM
from flare_jax.sampling.batch import PROMPT_SEGMENT
from flare_jax.sampling.denoising import DenoiseSchedule, Draft, denoise_block, propose
from flare_jax.sampling.prefill import prefill
from flare_jax.sampling.token_selection import SamplingParams, select_tokens

MODES = ("ar", "verified", "diffusion")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Static settings of a decoding mode (hashable: part of the compiled program's key)."""

    mode: str
    params: SamplingParams
    schedule: DenoiseSchedule
    mask_id: int = -1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.mode != "ar" and self.mask_id < 0:
            raise ValueError(f"mode {self.mode!r} needs the model config's mask_token_id (set when "
                             "the checkpoint is trained with FLARE)")

    @property
    def tokens_per_round(self) -> int:
        return 1 if self.mode == "ar" else self.schedule.block_size

    @property
    def slots_per_round(self) -> int:
        """Cache slots a round writes past a row's length before cutting back (diffusion also
        writes the next block's masks): the room a cache needs beyond the last new token."""
        return 2 * self.tokens_per_round if self.mode == "diffusion" else self.tokens_per_round


class Round(NamedTuple):
    """``tokens [B, R]`` of which the first ``count [B]`` are new, the forward passes the round
    cost each row, the updated cache, next-token logits and draft."""

    tokens: jax.Array
    count: jax.Array
    passes: jax.Array
    cache: DecodeCache
    last_logits: jax.Array
    draft: Draft


def accepted_length(draft: jax.Array, causal: jax.Array) -> jax.Array:
    """``1 +`` the longest run of ``draft[:, i + 1] == causal[:, i]`` (``draft[:, 0]`` is the
    causal model's own token, so at least one token is always kept)."""
    match = (draft[:, 1:] == causal[:, :-1]).astype(jnp.int32)
    return 1 + jnp.sum(jnp.cumprod(match, axis=1), axis=1)


def start(model: HybridLM, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
          cache_length: int, rng: jax.Array, settings: DecodeSettings
          ) -> tuple[jax.Array, DecodeCache, Draft]:
    """The causal prefill of left-padded prompts ``[B, P]`` into a fresh cache: the causal logits
    of each row's first new token, the cache and the first round's draft. Diffusion makes its
    first block's first denoising step in the same pass (the prompt then a block of masks);
    the other modes return an empty draft."""
    batch, size = tokens.shape[0], settings.tokens_per_round
    if settings.mode != "diffusion":
        last_logits, cache = prefill(model, tokens, segment_ids, positions, cache_length)
        return last_logits, cache, Draft.empty(batch, size)
    cache = init_cache(model.config, batch, cache_length, model.dtype)
    masks = jnp.full((batch, size), settings.mask_id, jnp.int32)
    block_positions = positions[:, -1:] + 1 + jnp.arange(size)[None, :]
    logits, noisy_logits, cache = model.append_then_denoise(tokens, segment_ids, positions, masks,
                                                            block_positions, cache)
    last_logits = logits[:, -1]
    draft = Draft(*propose(noisy_logits, last_logits, settings.schedule, settings.params, rng),
                  valid=jnp.ones((batch,), bool))
    return last_logits, cache, draft


def decode_round(model: HybridLM, cache: DecodeCache, last_logits: jax.Array, draft: Draft,
                 next_position: jax.Array, active: jax.Array, threshold: jax.Array,
                 rng: jax.Array, settings: DecodeSettings) -> Round:
    """Advance every row by one round of ``settings.mode``. Inactive rows cost nothing of value and
    their cache length does not move (what they write lands past their end). ``draft``
    (``[B, R]``, see :meth:`Draft.empty`) is read and replaced by diffusion only."""
    batch = last_logits.shape[0]
    size = settings.tokens_per_round
    params = settings.params
    positions = next_position[:, None] + jnp.arange(size)[None, :]
    segment = jnp.full((batch, size), PROMPT_SEGMENT, jnp.int32)
    first_rng, draft_rng, last_rng = jax.random.split(rng, 3)
    ones = jnp.ones((batch,), jnp.int32)
    if settings.mode == "ar":
        tokens = select_tokens(last_logits, params, first_rng)[:, None]
        logits, new_cache = model(tokens, segment, positions, cache)
        count, passes, new_logits = ones, ones, logits[:, -1]
    elif settings.mode == "diffusion":
        block = jnp.full((batch, size), settings.mask_id, jnp.int32)
        masked = jnp.broadcast_to(active[:, None], (batch, size))
        tokens, steps = denoise_block(model, cache, block, masked, positions, last_logits,
                                      threshold, settings.schedule, params, draft_rng, draft)
        logits, next_logits, new_cache = model.append_then_denoise(
            tokens, segment, positions, block, positions + size, cache)
        count, passes, new_logits = ones * size, steps + 1, logits[:, -1]
        draft = Draft(*propose(next_logits, new_logits, settings.schedule, params, last_rng),
                      valid=active)
    else:
        first = select_tokens(last_logits, params, first_rng)
        guess = jnp.full((batch, size), settings.mask_id, jnp.int32).at[:, 0].set(first)
        masked = (jnp.arange(size)[None, :] > 0) & active[:, None]
        tokens, steps = denoise_block(model, cache, guess, masked, positions, last_logits,
                                      threshold, settings.schedule, params, draft_rng)
        logits, full_cache, pending = model.append(tokens, segment, positions, cache)
        causal = select_tokens(logits, params, last_rng)
        count = jnp.where(active, accepted_length(tokens, causal), 0)
        new_cache = model.keep_prefix(full_cache, pending, count)
        new_logits = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None],
                                         axis=1)[:, 0]
        passes = steps + 1
    new_cache = dataclasses.replace(new_cache,
                                    length=jnp.where(active, new_cache.length, cache.length))
    new_logits = jnp.where(active[:, None], new_logits, last_logits)
    return Round(tokens, count, passes, new_cache, new_logits, draft)
