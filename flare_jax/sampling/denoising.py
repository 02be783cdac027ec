"""Parallel denoising of one block against a read-only cache (shared by diffusion and verified
decoding): repeat ``denoise`` and commit masked positions whose confidence passes a threshold."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flare_jax.model.cache import DecodeCache
from flare_jax.model.hybrid import HybridLM
from flare_jax.sampling.token_selection import SamplingParams, select_tokens


@dataclasses.dataclass(frozen=True)
class DenoiseSchedule:
    """How a block is unmasked.

    ``steps_per_block``: 0 -> confidence threshold (commit every masked position whose probability
    passes ``threshold``, at least one per step); k > 0 -> fixed steps (commit the
    ``ceil(block / k)`` most confident masked positions per step, so a block takes k steps).
    ``sub_blocks``: unmask the block in this many left-to-right pieces (1 = whole block at once).
    ``logit_shift``: the model was trained to predict token i from position i - 1 (the first
    position of a block then reads the causal logits of the token before the block).
    """

    block_size: int
    steps_per_block: int = 0
    sub_blocks: int = 1
    logit_shift: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.steps_per_block < 0 or self.steps_per_block > self.block_size:
            raise ValueError(f"steps_per_block must be in [0, block_size={self.block_size}], "
                             f"got {self.steps_per_block}")
        if self.sub_blocks < 1 or self.block_size % self.sub_blocks:
            raise ValueError(f"sub_blocks ({self.sub_blocks}) must divide block_size "
                             f"({self.block_size})")


class Draft(NamedTuple):
    """The first denoising step of a block, computed ahead by the pass that committed the block
    before it: ``tokens``/``confidence [B, bs]`` (the chosen token and its probability at every
    position) and ``valid [B]`` (rows without one start their block from scratch)."""

    tokens: jax.Array
    confidence: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, batch: int, size: int) -> Draft:
        return cls(jnp.zeros((batch, size), jnp.int32), jnp.zeros((batch, size), jnp.float32),
                   jnp.zeros((batch,), bool))


def propose(logits: jax.Array, before_logits: jax.Array, schedule: DenoiseSchedule,
            params: SamplingParams, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chosen token and its probability at every position of a block from its denoise logits
    ``[B, bs, V]`` (``before_logits [B, V]``: causal logits of the token before the block, read
    with ``logit_shift``)."""
    if schedule.logit_shift:
        logits = jnp.concatenate([before_logits[:, None], logits[:, :-1]], axis=1)
    logits = logits.astype(jnp.float32)
    choice = select_tokens(logits, params, rng)
    chosen = jnp.take_along_axis(logits, choice[..., None], axis=-1)[..., 0]
    return choice, jnp.exp(chosen - jax.nn.logsumexp(logits, axis=-1))


def _commit(tokens: jax.Array, masked: jax.Array, choice: jax.Array, confidence: jax.Array,
            threshold: jax.Array, schedule: DenoiseSchedule) -> tuple[jax.Array, jax.Array]:
    """One unmasking step: commit the schedule's share of masked positions to ``choice``."""
    size = tokens.shape[1]
    piece = size // schedule.sub_blocks
    per_step = -(-piece // schedule.steps_per_block) if schedule.steps_per_block else 0
    sub_block = jnp.arange(size) // piece
    # Candidates: masked positions of each row's first sub-block that still has masks.
    current = jnp.min(jnp.where(masked, sub_block, schedule.sub_blocks), axis=1, keepdims=True)
    candidate = masked & (sub_block == current)
    score = jnp.where(candidate, confidence, -1.0)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
    if per_step:
        commit = candidate & (rank < per_step)
    else:
        commit = candidate & ((confidence >= threshold) | (rank == 0))
    return jnp.where(commit, choice, tokens), masked & ~commit


def denoise_block(model: HybridLM, cache: DecodeCache, tokens: jax.Array, masked: jax.Array,
                  positions: jax.Array, before_logits: jax.Array, threshold: jax.Array,
                  schedule: DenoiseSchedule, params: SamplingParams, rng: jax.Array,
                  first: Draft | None = None) -> tuple[jax.Array, jax.Array]:
    """Fill the masked positions of ``tokens [B, bs]`` (``masked`` bool ``[B, bs]``).

    ``before_logits [B, V]``: causal logits of the token before the block (read with
    ``logit_shift``). ``first``: the block's first step where already computed (it costs no
    pass here). Returns the filled tokens and the number of denoise passes each row used.
    """
    if first is not None:
        ahead = masked & first.valid[:, None]
        filled, left = _commit(tokens, ahead, first.tokens, first.confidence, threshold, schedule)
        tokens, masked = filled, jnp.where(first.valid[:, None], left, masked)

    def cond(carry):
        return jnp.any(carry[1])

    def body(carry):
        tokens, masked, steps, rng = carry
        rng, step_rng = jax.random.split(rng)
        choice, confidence = propose(model.denoise(tokens, cache, positions), before_logits,
                                     schedule, params, step_rng)
        active = jnp.any(masked, axis=1)
        tokens, masked = _commit(tokens, masked, choice, confidence, threshold, schedule)
        return tokens, masked, steps + active.astype(jnp.int32), rng

    steps = jnp.zeros((tokens.shape[0],), jnp.int32)
    tokens, _, steps, _ = jax.lax.while_loop(cond, body, (tokens, masked, steps, rng))
    return tokens, steps
