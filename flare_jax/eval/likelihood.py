"""Causal log-likelihood of token sequences and corpus perplexity.

Sequences are packed into rows (best fit, segment ids 1..n, padding 0: the model never mixes
documents), rows are batched at power-of-two lengths, and one jitted function per ``[batch, length]``
bucket returns per-token log-probabilities; logits are reduced on the device (log-softmax in fp32),
never copied to the host. A token is scored from the tokens before it in its own sequence, so the
first token of a sequence is context only. Documents longer than ``max_length`` are scored in
rolling windows: every token is scored once, with as much left context as fits.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.data.sources import open_source
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.pretrained import Model

MIN_ROW_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class SequenceScore:
    """Summed log-probability of a sequence's scored tokens, their count, and whether each of them
    is the model's argmax choice."""

    logprob: float
    tokens: int
    greedy: bool


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_scores(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array,
                  segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log p(tokens[:, i] | tokens[:, :i])`` and whether it is the argmax, ``[B, T]`` each
    (column 0 is 0 / True: it has no context)."""
    logits = nnx.merge(graphdef, state)(tokens, segment_ids)[0][:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = target_logits - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == targets
    pad = ((0, 0), (1, 0))
    return jnp.pad(logprob, pad), jnp.pad(greedy, pad, constant_values=True)


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing packing of sequence indices into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            remaining, row = capacity - lengths[index], len(rows) - 1
        else:
            remaining, row = free.pop(slot)
            rows[row].append(index)
            remaining -= lengths[index]
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


def _row_length(used: int) -> int:
    return max(MIN_ROW_LENGTH, 1 << (used - 1).bit_length())


def score_sequences(model: Model, sequences: Sequence[Sequence[int]],
                    score_masks: Sequence[Sequence[bool]], *, max_length: int = 2048,
                    batch_size: int = 8) -> list[SequenceScore]:
    """Score each sequence's tokens where its mask is True (position 0 is never scored).

    Sequences (at most ``max_length`` tokens each) are packed into rows of ``max_length``
    tokens and run ``batch_size`` rows at a time.
    """
    if len(sequences) != len(score_masks):
        raise ValueError(f"{len(sequences)} sequences but {len(score_masks)} score masks")
    lengths = [len(s) for s in sequences]
    for i, (n, mask) in enumerate(zip(lengths, score_masks, strict=True)):
        if not 0 < n <= max_length:
            raise ValueError(f"sequence {i} has {n} tokens; expected 1..max_length={max_length}")
        if len(mask) != n:
            raise ValueError(f"sequence {i} has {n} tokens but a score mask of {len(mask)}")
    graphdef, state = nnx.split(model.module)
    rows = _pack(lengths, max_length)
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))
    scores: list[SequenceScore | None] = [None] * len(sequences)
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        width = _row_length(max(sum(lengths[i] for i in row) for row in batch))
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        placed = []
        for r, row in enumerate(batch):
            start = 0
            for segment, index in enumerate(row, 1):
                end = start + lengths[index]
                tokens[r, start:end] = sequences[index]
                segments[r, start:end] = segment
                placed.append((index, r, start, end))
                start = end
        logprob, greedy = (np.asarray(x) for x in _token_scores(
            graphdef, state, jnp.asarray(tokens), jnp.asarray(segments)))
        for index, r, start, end in placed:
            mask = np.asarray(score_masks[index], bool).copy()
            mask[0] = False
            scores[index] = SequenceScore(float(logprob[r, start:end][mask].sum(dtype=np.float64)),
                                          int(mask.sum()), bool(greedy[r, start:end][mask].all()))
    return scores  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], loss_mask: Sequence[bool], max_length: int
                    ) -> Iterator[tuple[list[int], list[bool]]]:
    """Split a document into windows of at most ``max_length`` tokens with score masks: every
    token after the first is scored in exactly one window (where ``loss_mask`` allows), with as
    much left context as the window holds."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    n = len(tokens)
    predict = 1  # first token not yet scored
    while True:
        end = min(n, predict + max_length - 1)
        begin = max(0, end - max_length)
        mask = [bool(m) and begin + j >= predict for j, m in enumerate(loss_mask[begin:end])]
        yield list(tokens[begin:end]), mask
        if end == n:
            return
        predict = end


@dataclasses.dataclass
class LikelihoodReport:
    """Mean token negative log-likelihood (nats) and perplexity over a corpus."""

    documents: int
    tokens: int
    nll: float
    perplexity: float
    tokens_per_second: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def corpus_likelihood(model: Model, tokenizer: DocumentTokenizer, paths: Sequence[str], *,
                      max_length: int = 2048, batch_size: int = 8, limit: int | None = None,
                      pool: int = 1024) -> LikelihoodReport:
    """Mean NLL over the loss-mask tokens of the documents in ``paths`` (jsonl / parquet /
    array_record; the first ``limit`` documents if given), scored ``pool`` windows at a time."""
    if isinstance(paths, str):
        raise TypeError("paths must be a sequence of file paths, not one string")
    documents, total_tokens, total_logprob = 0, 0, 0.0
    windows: list[tuple[list[int], list[bool]]] = []
    start = time.perf_counter()

    def flush() -> None:
        nonlocal total_tokens, total_logprob
        if windows:
            seqs, masks = zip(*windows, strict=True)
            for score in score_sequences(model, seqs, masks, max_length=max_length,
                                         batch_size=batch_size):
                total_tokens += score.tokens
                total_logprob += score.logprob
            windows.clear()

    for path in paths:
        source = open_source(str(path))
        for index in range(len(source)):
            if limit is not None and documents >= limit:
                break
            doc = tokenizer(source[index])
            windows.extend(rolling_windows(doc["tokens"].tolist(), doc["loss_mask"].tolist(),
                                           max_length))
            documents += 1
            if len(windows) >= pool:
                flush()
    flush()
    if total_tokens == 0:
        raise ValueError(f"no scored tokens in {list(paths)} (empty corpus or empty loss masks)")
    nll = -total_logprob / total_tokens
    return LikelihoodReport(documents, total_tokens, nll, math.exp(nll),
                            total_tokens / (time.perf_counter() - start))
