"""Per-document statistics under the seed AR model: mean token log-likelihood, perplexity, length,
and for chat records the same statistics over response (trained) and prompt tokens separately.

Every token after the first is predicted from its prefix (there is no BOS); the EOS appended by
:class:`~flare_jax.data.DocumentTokenizer` is scored too. Documents longer than ``max_length`` are
scored on their first ``max_length`` tokens (``truncated``). A batch holds ``batch_size`` documents,
right-padded (segment 0) to a power-of-two width, so the model compiles once per width bucket.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.data.records import Record
from flare_jax.data.sources import open_source
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.data.tools.io import ROW_SUFFIXES, ChunkedOutput
from flare_jax.model.hybrid import HybridLM
from flare_jax.pretrained import Model

log = logging.getLogger(__name__)
MIN_WIDTH = 16


@nnx.jit
def _target_logprobs(module: HybridLM, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T-1]`` fp32 log-probability of token ``t+1`` given tokens ``<= t``."""
    logits = module(tokens, segment_ids)[0][:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _width(length: int, max_length: int) -> int:
    return min(max(MIN_WIDTH, 1 << (length - 1).bit_length()), max_length)


def _likelihood(prefix: str, logprobs: np.ndarray) -> dict[str, Any]:
    """Mean log-probability and perplexity of ``logprobs`` (``None`` when empty)."""
    mean = float(logprobs.mean(dtype=np.float64)) if logprobs.size else None
    return {f"{prefix}mean_logprob": mean,
            f"{prefix}perplexity": None if mean is None else math.exp(-mean)}


def document_stats(logprobs: np.ndarray, loss_mask: np.ndarray, *, chat: bool,
                   length: int) -> dict[str, Any]:
    """Statistics of one document from the log-probabilities of its tokens ``1..n-1`` and its loss
    mask (``True`` on response tokens of chat records); the ``response_*`` / ``prompt_*`` fields
    are ``None`` for plain text."""
    stats: dict[str, Any] = {"length": length, "scored_tokens": int(logprobs.size),
                             "truncated": length > logprobs.size + 1, "chat": chat,
                             **_likelihood("", logprobs)}
    response = loss_mask[1:logprobs.size + 1]
    for prefix, keep in (("response_", response), ("prompt_", ~response)):
        group = {f"{prefix}tokens": int(keep.sum()), **_likelihood(prefix, logprobs[keep])}
        stats.update(group if chat else dict.fromkeys(group))
    return stats


class DocumentScorer:
    """Score records with a loaded model, ``batch_size`` documents per forward pass."""

    def __init__(self, model: Model, tokenizer: DocumentTokenizer, batch_size: int = 8,
                 max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        context = model.config.max_position_embeddings
        self.max_length = context if max_length is None else max_length
        if not 2 <= self.max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}], got {self.max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = model.config.pad_token_id or 0

    def score(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Statistics of each record (see :func:`document_stats`), in the order given."""
        docs = [self.tokenizer(r) for r in records]
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]["tokens"]))  # less padding
        out: list[dict[str, Any]] = [{} for _ in docs]
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logprobs = self._logprobs([docs[i]["tokens"][:self.max_length] for i in batch])
            for i, lp in zip(batch, logprobs, strict=True):
                out[i] = document_stats(lp, docs[i]["loss_mask"], chat=records[i].is_chat,
                                        length=len(docs[i]["tokens"]))
        return out

    def _logprobs(self, token_lists: list[np.ndarray]) -> list[np.ndarray]:
        width = _width(max(len(t) for t in token_lists), self.max_length)
        tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
        segment_ids = np.zeros((self.batch_size, width), np.int32)
        for row, ids in enumerate(token_lists):
            tokens[row, :len(ids)] = ids
            segment_ids[row, :len(ids)] = 1
        logprobs = np.asarray(_target_logprobs(self.model.module, jnp.asarray(tokens),
                                               jnp.asarray(segment_ids)))
        return [logprobs[row, :len(ids) - 1] for row, ids in enumerate(token_lists)]


def default_scores_path(data: str | Path, fmt: str = "jsonl") -> Path:
    """``dir/name.scores.<fmt>`` next to ``dir/name.<suffix>``."""
    if f".{fmt}" not in ROW_SUFFIXES:
        raise ValueError(f"format must be one of {[s[1:] for s in ROW_SUFFIXES]}, got {fmt!r}")
    data = Path(data)
    return data.with_name(f"{data.name.rsplit('.', 1)[0]}.scores.{fmt}")


def score_file(data: str | Path, model: Model, tokenizer: DocumentTokenizer,
               output: str | Path | None = None, *, batch_size: int = 8, chunk_size: int = 256,
               max_length: int | None = None, overwrite: bool = False) -> Path:
    """Score every record of ``data`` (jsonl / parquet / array_record) into ``output`` (default
    :func:`default_scores_path`): one row per record with its ``index`` and statistics.

    All records are validated before anything is written (a malformed one raises naming file and
    line). Rows are written in chunks of ``chunk_size`` records; an interrupted run resumes at the
    first unfinished chunk. Returns the output path.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    source = open_source(str(data))
    records = [source[i] for i in range(len(source))]
    scorer = DocumentScorer(model, tokenizer, batch_size, max_length)
    output = Path(output) if output is not None else default_scores_path(data)
    chunks = ChunkedOutput(output, {
        "kind": "score", "data": str(Path(data).absolute()), "records": len(records),
        "checkpoint": str(model.directory), "chunk_size": chunk_size,
        "max_length": scorer.max_length,
    }, overwrite=overwrite)
    num_chunks = -(-len(records) // chunk_size)
    for chunk in range(num_chunks):
        if chunks.done(chunk):
            continue
        start = chunk * chunk_size
        stats = scorer.score(records[start:start + chunk_size])
        chunks.write(chunk, [{"index": start + i, **row} for i, row in enumerate(stats)])
        log.info("%s: scored %d/%d records", data, min(start + chunk_size, len(records)),
                 len(records))
    return chunks.finish(num_chunks)
