"""The public sampler: one checkpoint, batched generation from token ids, text or chats."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from flare_jax.data.chat import RenderFn
from flare_jax.data.records import Message
from flare_jax.pretrained import Model, load
from flare_jax.sampling.batch import PromptBatch, bucket
from flare_jax.sampling.denoising import DenoiseSchedule
from flare_jax.sampling.loop import generate_batch
from flare_jax.sampling.rounds import DecodeSettings
from flare_jax.sampling.token_selection import SamplingParams

LENGTH_BUCKET = 16
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


@dataclasses.dataclass
class GenerationResult:
    """One request's output and statistics."""

    tokens: list[int]
    text: str | None
    finish_reason: str  # "eos", "stop" or "length"
    forward_passes: int
    latency_s: float

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forward_passes, 1)


class Sampler:
    """Generate from a loaded :class:`~flare_jax.pretrained.Model`.

    ``tokenizer`` decodes text and encodes string prompts; ``chat_template`` (a render function
    ``(messages, add_generation_prompt) -> str``) formats chat prompts when ``chat=True``.
    """

    def __init__(self, model: Model, tokenizer: tokenizers.Tokenizer | None = None,
                 chat_template: RenderFn | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.graphdef, self.state = nnx.split(model.module)

    @classmethod
    def load(cls, ckpt_dir: str | Path, dtype: str = "float32", backend: str = "auto") -> Sampler:
        """Load a checkpoint with its ``tokenizer.json`` and chat template when present."""
        from flare_jax.data.tokenize import DocumentTokenizer

        model = load(ckpt_dir, dtype=dtype, backend=backend)
        tokenizer = template = None
        if (Path(ckpt_dir) / "tokenizer.json").is_file():
            try:
                document = DocumentTokenizer.from_dir(str(ckpt_dir))
                tokenizer, template = document.tokenizer, document.template.render
            except ValueError:  # no EOS named or ChatML tokens missing: plain text only
                tokenizer = tokenizers.Tokenizer.from_file(str(Path(ckpt_dir) / "tokenizer.json"))
        return cls(model, tokenizer, template)

    def encode(self, prompts: Sequence[Prompt], chat: bool = False) -> list[list[int]]:
        """Token ids of each prompt (validated); chats are rendered with the chat template."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings, token-id lists or chats")
        encoded = []
        for i, prompt in enumerate(prompts):
            if chat:
                prompt = self._render_chat(prompt, i)
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids instead")
                prompt = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} holds token ids outside the vocabulary: {bad[:5]}")
            encoded.append(ids)
        return encoded

    def _render_chat(self, prompt: Prompt, index: int) -> str:
        if self.chat_template is None:
            raise ValueError("chat=True needs a chat template (Sampler.load reads the checkpoint's)")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        try:
            messages = [Message(m["role"], m["content"]) for m in prompt]
        except (TypeError, KeyError):
            raise ValueError(f"chat prompt {index} must be a string or a list of "
                             "{'role': ..., 'content': ...} messages") from None
        return self.chat_template(messages, True)

    def decode_settings(self, mode: str, temperature: float, top_k: int, top_p: float,
                        block_size: int, steps_per_block: int, sub_blocks: int,
                        logit_shift: bool) -> DecodeSettings:
        """Validated static settings of a decoding mode for this model."""
        mask_id = self.model.config.mask_token_id
        return DecodeSettings(mode, SamplingParams(temperature, top_k, top_p),
                              DenoiseSchedule(block_size, steps_per_block, sub_blocks, logit_shift),
                              -1 if mask_id is None else mask_id)

    def generate(self, prompts: Sequence[Prompt], mode: str = "ar", *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop: Sequence[str] = (),
                 stop_token_ids: Sequence[int] | None = None, block_size: int = 8,
                 threshold: float = 0.9, steps_per_block: int = 0, sub_blocks: int = 1,
                 logit_shift: bool = False, chat: bool = False, seed: int = 0
                 ) -> list[GenerationResult]:
        """Generate a continuation for each prompt (token-id lists, strings, or chats with
        ``chat=True``), as one static batch.

        Modes: "ar" (one token per causal step); "diffusion" (blocks of ``block_size`` mask
        tokens denoised in parallel: each step commits every masked position whose probability
        passes ``threshold``, at least one, or with ``steps_per_block`` > 0 a fixed number of steps
        per block; ``sub_blocks`` unmasks a block in left-to-right pieces; the causal pass that
        writes a block to the caches also makes the next block's first denoising step, so a block
        of ``s`` steps costs ``s`` forward passes, the first block ``s + 1``); "verified" (the
        diffusion draft of each block is checked by the causal pass, keeping its longest prefix
        that equals the causal model's own choices; with ``temperature=0`` the output equals "ar"
        token for token). ``logit_shift`` must match how
        the checkpoint was trained. Generation ends at a token of ``stop_token_ids`` (default: the
        config's EOS ids; the token is kept), after ``max_new_tokens``, or at the first ``stop``
        string (the text is cut before it). For streaming and slot refill use :class:`Engine`.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if mode != "ar" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        settings = self.decode_settings(mode, temperature, top_k, top_p, block_size,
                                        steps_per_block, sub_blocks, logit_shift)
        encoded = self.encode(prompts, chat)
        stop_ids = tuple(self.model.config.eos_token_id if stop_token_ids is None
                         else stop_token_ids)
        args, static = self.batch_arguments(encoded, settings, max_new_tokens, stop_ids,
                                            threshold, seed)
        start = time.perf_counter()
        out = generate_batch(*args, **static)
        tokens, num_new, passes = (np.asarray(x) for x in out)
        latency = time.perf_counter() - start
        results = []
        for i in range(len(encoded)):
            row = tokens[i, :num_new[i]].tolist()
            cut = self.stop_index(row, stop)
            results.append(self.make_result(row if cut is None else row[:cut], stop,
                                            set(stop_ids), int(passes[i]), latency))
        return results

    def batch_arguments(self, encoded: Sequence[Sequence[int]], settings: DecodeSettings,
                        max_new_tokens: int, stop_ids: Sequence[int], threshold: float,
                        seed: int) -> tuple[tuple, dict]:
        """Positional and static keyword arguments of :func:`generate_batch` for token-id prompts
        (the first positional one, the graph definition, is static too)."""
        config = self.model.config
        batch = PromptBatch.left_padded(encoded, pad_id=config.pad_token_id or 0,
                                        multiple=LENGTH_BUCKET)
        cache_length = batch.tokens.shape[1] + bucket(max_new_tokens + settings.slots_per_round,
                                                      LENGTH_BUCKET)
        if cache_length > config.max_position_embeddings:
            raise ValueError(f"prompt ({batch.tokens.shape[1]} padded) + max_new_tokens "
                             f"({max_new_tokens}) exceeds the context of "
                             f"{config.max_position_embeddings} tokens")
        args = (self.graphdef, self.state, jnp.asarray(batch.tokens),
                jnp.asarray(batch.segment_ids), jnp.asarray(batch.positions),
                jnp.asarray(batch.lengths), jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32),
                jnp.float32(threshold), jax.random.key(seed))
        return args, dict(settings=settings, max_new_tokens=max_new_tokens,
                          cache_length=cache_length)

    def stop_index(self, tokens: list[int], stop: Sequence[str]) -> int | None:
        """Number of tokens to keep when the decoded text contains a stop string (None if not):
        the shortest prefix whose text contains it."""
        if not stop or self.tokenizer is None:
            return None
        if not any(s in self.tokenizer.decode(tokens) for s in stop):
            return None
        return next(n for n in range(1, len(tokens) + 1)
                    if any(s in self.tokenizer.decode(tokens[:n]) for s in stop))

    def make_result(self, tokens: list[int], stop: Sequence[str], stop_ids: set[int],
                    passes: int, latency: float) -> GenerationResult:
        """A result with the text cut before the first stop string."""
        reason = "eos" if tokens and tokens[-1] in stop_ids else "length"
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(tokens)
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text, reason = text[:min(cuts)], "stop"
        return GenerationResult(tokens, text, reason, passes, latency)
