"""One decoding round per mode, over every row of a batch of independent requests.

A round reads the cache and ``last_logits`` (the causal prediction of each row's next token) and
returns up to ``R`` new tokens per row: AR one token, diffusion one block, verified one checked
draft. Every mode keeps the same state, so one loop (static batches) and one engine (slots
refilled from a queue) drive all three.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flare_jax.model.cache import DecodeCache
from flare_jax.model.hybrid import HybridLM
from flare_jax.sampling.batch import PROMPT_SEGMENT
from flare_jax.sampling.denoising import DenoiseSchedule, denoise_block
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


class Round(NamedTuple):
    """``tokens [B, R]`` of which the first ``count [B]`` are new, the forward passes the round
    cost each row, the updated cache and next-token logits."""

    tokens: jax.Array
    count: jax.Array
    passes: jax.Array
    cache: DecodeCache
    last_logits: jax.Array


def accepted_length(draft: jax.Array, causal: jax.Array) -> jax.Array:
    """``1 +`` the longest run of ``draft[:, i + 1] == causal[:, i]`` (``draft[:, 0]`` is the
    causal model's own token, so at least one token is always kept)."""
    match = (draft[:, 1:] == causal[:, :-1]).astype(jnp.int32)
    return 1 + jnp.sum(jnp.cumprod(match, axis=1), axis=1)


def decode_round(model: HybridLM, cache: DecodeCache, last_logits: jax.Array,
                 next_position: jax.Array, active: jax.Array, threshold: jax.Array,
                 rng: jax.Array, settings: DecodeSettings) -> Round:
    """Advance every row by one round of ``settings.mode``. Inactive rows cost nothing of value and
    their cache length does not move (what they write lands past their end)."""
    batch = last_logits.shape[0]
    size = settings.tokens_per_round
    params = settings.params
    positions = next_position[:, None] + jnp.arange(size)[None, :]
    segment = jnp.full((batch, size), PROMPT_SEGMENT, jnp.int32)
    first_rng, draft_rng, check_rng = jax.random.split(rng, 3)
    ones = jnp.ones((batch,), jnp.int32)
    if settings.mode == "ar":
        tokens = select_tokens(last_logits, params, first_rng)[:, None]
        logits, new_cache = model(tokens, segment, positions, cache)
        count, passes, new_logits = ones, ones, logits[:, -1]
    elif settings.mode == "diffusion":
        block = jnp.full((batch, size), settings.mask_id, jnp.int32)
        masked = jnp.broadcast_to(active[:, None], (batch, size))
        tokens, steps = denoise_block(model, cache, block, masked, positions, last_logits,
                                      threshold, settings.schedule, params, draft_rng)
        logits, new_cache = model(tokens, segment, positions, cache)
        count, passes, new_logits = ones * size, steps + 1, logits[:, -1]
    else:
        first = select_tokens(last_logits, params, first_rng)
        draft = jnp.full((batch, size), settings.mask_id, jnp.int32).at[:, 0].set(first)
        masked = (jnp.arange(size)[None, :] > 0) & active[:, None]
        tokens, steps = denoise_block(model, cache, draft, masked, positions, last_logits,
                                      threshold, settings.schedule, params, draft_rng)
        logits, full_cache, pending = model.append(tokens, segment, positions, cache)
        causal = select_tokens(logits, params, check_rng)
        count = jnp.where(active, accepted_length(tokens, causal), 0)
        new_cache = model.keep_prefix(full_cache, pending, count)
        new_logits = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None],
                                         axis=1)[:, 0]
        passes = steps + 1
    new_cache = dataclasses.replace(new_cache,
                                    length=jnp.where(active, new_cache.length, cache.length))
    new_logits = jnp.where(active[:, None], new_logits, last_logits)
    return Round(tokens, count, passes, new_cache, new_logits)
