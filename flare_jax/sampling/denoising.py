"""Parallel denoising of one block against a read-only cache (shared by diffusion and verified
decoding): repeat ``denoise`` and commit masked positions whose confidence passes a threshold."""

from __future__ import annotations

import dataclasses

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


def denoise_block(model: HybridLM, cache: DecodeCache, tokens: jax.Array, masked: jax.Array,
                  positions: jax.Array, before_logits: jax.Array, threshold: jax.Array,
                  schedule: DenoiseSchedule, params: SamplingParams, rng: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Fill the masked positions of ``tokens [B, bs]`` (``masked`` bool ``[B, bs]``).

    ``before_logits [B, V]``: causal logits of the token before the block (read with
    ``logit_shift``). Returns the filled tokens and the number of denoise passes each row used.
    """
    batch, size = tokens.shape
    piece = size // schedule.sub_blocks
    per_step = -(-piece // schedule.steps_per_block) if schedule.steps_per_block else 0
    sub_block = jnp.arange(size) // piece

    def cond(carry):
        return jnp.any(carry[1])

    def body(carry):
        tokens, masked, steps, rng = carry
        logits = model.denoise(tokens, cache, positions)
        if schedule.logit_shift:
            logits = jnp.concatenate([before_logits[:, None], logits[:, :-1]], axis=1)
        rng, step_rng = jax.random.split(rng)
        choice = select_tokens(logits, params, step_rng)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        confidence = jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
        # Candidates: masked positions of each row's first sub-block that still has masks.
        current = jnp.min(jnp.where(masked, sub_block, schedule.sub_blocks), axis=1, keepdims=True)
        candidate = masked & (sub_block == current)
        score = jnp.where(candidate, confidence, -1.0)
        rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
        if per_step:
            commit = candidate & (rank < per_step)
        else:
            commit = candidate & ((confidence >= threshold) | (rank == 0))
        active = jnp.any(masked, axis=1)
        return (jnp.where(commit, choice, tokens), masked & ~commit,
                steps + active.astype(jnp.int32), rng)

    steps = jnp.zeros((batch,), jnp.int32)
    tokens, _, steps, _ = jax.lax.while_loop(cond, body, (tokens, masked, steps, rng))
    return tokens, steps
