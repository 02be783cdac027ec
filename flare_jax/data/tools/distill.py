"""Self-distillation: responses of the seed model to a prompt set, as chat training records.

Prompts are JSON lines with a ``prompt`` string (one user turn) or a ``messages`` list whose last
turn is not the assistant's. Each prompt is rendered with the checkpoint's chat template and its
generation prompt, then answered by the AR sampler in batches of ``batch_size``. Generation stops at
an EOS id or the token that ends an assistant turn. Output rows (jsonl or parquet) hold ``index``,
``messages`` (the prompt turns plus the assistant response: what training reads), ``prompt`` (when
given as a string), ``response``, ``finish_reason``, ``response_tokens`` and ``generation`` (the
checkpoint and sampling settings, with the batch's seed). Runs resume by chunk like scoring.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flare_jax.data.records import ROLES, Message, RecordError
from flare_jax.data.sources import json_lines
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.data.tools.io import ChunkedOutput
from flare_jax.sampling import Sampler
from flare_jax.sampling.batch import bucket
from flare_jax.sampling.sampler import LENGTH_BUCKET

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """AR sampling settings of a self-distillation run."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Prompt:
    index: int
    messages: tuple[Message, ...]
    text: str | None  # the ``prompt`` string, when given as one
    token_ids: list[int]


def parse_prompt(raw: Any, where: str) -> tuple[tuple[Message, ...], str | None]:
    """Validate one prompt record into its turns (and its ``prompt`` string, if any)."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(raw).__name__}")
    if isinstance(raw.get("prompt"), str):
        return (Message("user", raw["prompt"]),), raw["prompt"]
    turns = raw.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: expected a 'prompt' string or a non-empty 'messages' list")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        if role not in ROLES or not isinstance(turn.get("content"), str):
            raise RecordError(f"{where}: messages[{i}] must be {{role, content}} with a string "
                              f"content and a role among {ROLES}")
        messages.append(Message(role, turn["content"]))
    if messages[-1].role == "assistant":
        raise RecordError(f"{where}: the last turn is the assistant's; nothing to answer")
    return tuple(messages), None


def _read_prompts(path: Path, tokenizer: DocumentTokenizer, context: int,
                  max_new_tokens: int) -> list[_Prompt]:
    """Validate, render and encode every prompt; each must fit the sampler's (bucketed) cache."""
    new_tokens = bucket(max_new_tokens + 1, LENGTH_BUCKET)
    prompts = []
    for where, raw in json_lines(path):
        messages, text = parse_prompt(raw, where)
        rendered = tokenizer.template.render(messages, True)
        ids = tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids
        if bucket(len(ids), LENGTH_BUCKET) + new_tokens > context:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens; with "
                             f"max_new_tokens={max_new_tokens} it exceeds the context of "
                             f"{context} tokens")
        prompts.append(_Prompt(len(prompts), messages, text, ids))
    return prompts


def _stop_ids(sampler: Sampler, tokenizer: DocumentTokenizer) -> list[int]:
    """EOS ids of the config and tokenizer, and the token closing an assistant turn (if one)."""
    ids = {*sampler.model.config.eos_token_id, tokenizer.eos_id}
    turn_end = tokenizer.tokenizer.token_to_id(tokenizer.template.turn_end.strip())
    return sorted(ids if turn_end is None else ids | {turn_end})


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def self_distill(prompts: str | Path, sampler: Sampler, tokenizer: DocumentTokenizer,
                 output: str | Path, *, settings: GenerationSettings = GenerationSettings(),
                 batch_size: int = 8, chunk_size: int = 64, overwrite: bool = False) -> Path:
    """Answer every prompt of ``prompts`` (jsonl) with ``sampler`` in AR mode into ``output``.

    All prompts are validated (and must fit the context with ``max_new_tokens``) before anything
    is written; output is written in chunks of ``chunk_size`` prompts and an interrupted run
    resumes at the first unfinished chunk. A short last batch is padded with copies of its first
    prompt so every batch has one shape. Returns the output path.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    items = _read_prompts(Path(prompts), tokenizer, sampler.model.config.max_position_embeddings,
                          settings.max_new_tokens)
    generation = {"checkpoint": str(sampler.model.directory), "mode": "ar",
                  **dataclasses.asdict(settings)}
    chunks = ChunkedOutput(Path(output), {
        "kind": "self-distill", "prompts": str(Path(prompts).absolute()), "records": len(items),
        "batch_size": batch_size, "chunk_size": chunk_size, **generation,
    }, overwrite=overwrite)
    stop_ids = _stop_ids(sampler, tokenizer)
    num_chunks = -(-len(items) // chunk_size)
    batches_per_chunk = -(-chunk_size // batch_size)
    for chunk in range(num_chunks):
        if chunks.done(chunk):
            continue
        rows = []
        chunk_items = items[chunk * chunk_size:(chunk + 1) * chunk_size]
        for start in range(0, len(chunk_items), batch_size):
            batch = chunk_items[start:start + batch_size]
            seed = _batch_seed(settings.seed, chunk * batches_per_chunk + start // batch_size)
            padded = [p.token_ids for p in batch] + [batch[0].token_ids] * (batch_size - len(batch))
            results = sampler.generate(
                padded, mode="ar", max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                stop_token_ids=stop_ids, seed=seed)
            for item, result in zip(batch, results, strict=False):
                rows.append(_row(item, result.tokens, result.finish_reason, tokenizer, stop_ids,
                                 {**generation, "seed": seed}))
        chunks.write(chunk, rows)
        log.info("%s: answered %d/%d prompts", prompts, chunk * chunk_size + len(chunk_items),
                 len(items))
    return chunks.finish(num_chunks)


def _row(item: _Prompt, tokens: list[int], finish_reason: str, tokenizer: DocumentTokenizer,
         stop_ids: list[int], generation: dict[str, Any]) -> dict[str, Any]:
    response = tokenizer.tokenizer.decode([t for t in tokens if t not in stop_ids])
    turns = [{"role": m.role, "content": m.content} for m in item.messages]
    row: dict[str, Any] = {"index": item.index,
                           "messages": [*turns, {"role": "assistant", "content": response}]}
    if item.text is not None:
        row["prompt"] = item.text
    return {**row, "response": response, "finish_reason": finish_reason,
            "response_tokens": len(tokens), "generation": generation}
