"""Batched serving engine: requests of different lengths and limits progress independently in a
fixed number of slots; a finished slot is refilled from the queue. Programs are compiled once per
shape bucket (one round program; one prefill program per prompt-length bucket)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.model.cache import DecodeCache, init_cache
from flare_jax.sampling.batch import PromptBatch, bucket
from flare_jax.sampling.denoising import Draft
from flare_jax.sampling.rounds import DecodeSettings, Round, decode_round, start
from flare_jax.sampling.sampler import LENGTH_BUCKET, GenerationResult, Sampler

TokenCallback = Callable[[int, list[int]], None]


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    tokens: list[int] = dataclasses.field(default_factory=list)
    passes: int = 1
    started: float = 0.0


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "settings"),
                   donate_argnums=(2, 3, 4))
def _prefill_slot(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeCache,
                  last_logits: jax.Array, draft: Draft, slot: jax.Array, tokens: jax.Array,
                  segment_ids: jax.Array, positions: jax.Array, rng: jax.Array, *,
                  cache_length: int, settings: DecodeSettings
                  ) -> tuple[DecodeCache, jax.Array, Draft]:
    """Prefill one prompt ``[1, P]`` into a fresh row and place it (its cache, logits and first
    draft) at ``slot`` of the batch."""
    logits, row, row_draft = start(nnx.merge(graphdef, state), tokens, segment_ids, positions,
                                   cache_length, rng, settings)
    place = functools.partial(jax.lax.dynamic_update_index_in_dim, index=slot, axis=0)
    return jax.tree.map(lambda full, one: place(full, one[0]), (cache, last_logits, draft),
                        (row, logits, row_draft))


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"), donate_argnums=(2, 3, 4))
def _round(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeCache, last_logits: jax.Array,
           draft: Draft, next_position: jax.Array, active: jax.Array, threshold: jax.Array,
           rng: jax.Array, *, settings: DecodeSettings) -> Round:
    return decode_round(nnx.merge(graphdef, state), cache, last_logits, draft, next_position,
                        active, threshold, rng, settings)


class Engine:
    """Serve many requests through ``num_slots`` decoding slots of ``max_length`` tokens each.

    ``submit`` queues a request; ``run`` decodes until the queue is empty and every slot is idle,
    calling ``on_tokens(request_id, new_tokens)`` as tokens are produced (streaming). Stop tokens,
    stop strings (checked on the decoded text after every round) and per-request token budgets
    end a request; its slot is refilled at once.
    """

    def __init__(self, sampler: Sampler, *, num_slots: int = 8, max_length: int = 1024,
                 mode: str = "ar", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 block_size: int = 8, threshold: float = 0.9, steps_per_block: int = 0,
                 sub_blocks: int = 1, logit_shift: bool = False,
                 stop_token_ids: Sequence[int] | None = None, seed: int = 0):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.sampler = sampler
        config = sampler.model.config
        self.settings = sampler.decode_settings(mode, temperature, top_k, top_p, block_size,
                                                steps_per_block, sub_blocks, logit_shift)
        self.threshold = jnp.float32(threshold)
        self.num_slots, self.max_length = num_slots, max_length
        self.stop_ids = set(config.eos_token_id if stop_token_ids is None else stop_token_ids)
        self._queue: collections.deque[_Request] = collections.deque()
        self._next_id = 0
        self._rng = jax.random.key(seed)

    def submit(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
               stop: Sequence[str] = ()) -> int:
        """Queue one request; returns its id."""
        (tokens,) = self.sampler.encode([prompt])
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop and self.sampler.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        need = (bucket(len(tokens), LENGTH_BUCKET) + max_new_tokens
                + self.settings.slots_per_round)
        if need > self.max_length:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"needs {need} cache slots; the engine's max_length is "
                             f"{self.max_length}")
        request = _Request(self._next_id, tokens, max_new_tokens, tuple(stop))
        self._queue.append(request)
        self._next_id += 1
        return request.id

    def run(self, on_tokens: TokenCallback | None = None) -> dict[int, GenerationResult]:
        """Decode every queued request; returns results by request id."""
        sampler, slots = self.sampler, self.num_slots
        graphdef, state = sampler.graphdef, sampler.state
        config = sampler.model.config
        cache = init_cache(config, slots, self.max_length, sampler.model.module.dtype)
        last_logits = jnp.zeros((slots, config.vocab_size), jnp.float32)
        draft = Draft.empty(slots, self.settings.tokens_per_round)
        running: list[_Request | None] = [None] * slots
        next_position = np.zeros(slots, np.int32)
        results: dict[int, GenerationResult] = {}
        while self._queue or any(r is not None for r in running):
            for slot in range(slots):
                if running[slot] is None and self._queue:
                    request = self._queue.popleft()
                    request.started = time.perf_counter()
                    batch = PromptBatch.left_padded([request.prompt], pad_id=config.pad_token_id or 0,
                                                    multiple=LENGTH_BUCKET)
                    self._rng, start_rng = jax.random.split(self._rng)
                    cache, last_logits, draft = _prefill_slot(
                        graphdef, state, cache, last_logits, draft, jnp.int32(slot),
                        jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids),
                        jnp.asarray(batch.positions), start_rng, cache_length=self.max_length,
                        settings=self.settings)
                    next_position[slot] = len(request.prompt)
                    running[slot] = request
            active = np.array([r is not None for r in running])
            self._rng, round_rng = jax.random.split(self._rng)
            step = _round(graphdef, state, cache, last_logits, draft, jnp.asarray(next_position),
                          jnp.asarray(active), self.threshold, round_rng, settings=self.settings)
            cache, last_logits, draft = step.cache, step.last_logits, step.draft
            tokens, count, passes = (np.asarray(x) for x in (step.tokens, step.count, step.passes))
            for slot, request in enumerate(running):
                if request is None:
                    continue
                next_position[slot] += count[slot]
                request.passes += int(passes[slot])
                finished = self._extend(request, tokens[slot, :count[slot]].tolist(), on_tokens)
                if finished is not None:
                    results[request.id] = finished
                    running[slot] = None
        return results

    def _extend(self, request: _Request, new: list[int], on_tokens: TokenCallback | None
                ) -> GenerationResult | None:
        """Add a round's tokens to a request (cut at a stop token, a stop string or the budget)
        and stream them; returns the result when the request is finished."""
        new = new[:request.max_new_tokens - len(request.tokens)]
        stop_at = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        if stop_at is not None:
            new = new[:stop_at + 1]
        text_cut = self.sampler.stop_index(request.tokens + new, request.stop)
        if text_cut is not None:
            new = new[:text_cut - len(request.tokens)]
        request.tokens.extend(new)
        if on_tokens is not None and new:
            on_tokens(request.id, new)
        if stop_at is None and text_cut is None and len(request.tokens) < request.max_new_tokens:
            return None
        latency = time.perf_counter() - request.started
        return self.sampler.make_result(request.tokens, request.stop, self.stop_ids,
                                        request.passes, latency)
