"""Likelihood scoring: packed, bucketed, jitted scores equal a hand computation from
``model.logits``; rolling windows score every token once; corpus NLL follows the loss mask."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_helpers import ATOL, WIDTH, hand_logprobs

import flare_jax
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.eval import likelihood
from flare_jax.eval.likelihood import corpus_likelihood, rolling_windows, score_sequences


def test_packed_scores_equal_hand_computation(eval_sampler):
    """Masks, packing and the greedy flag; one compile per [batch, length] bucket."""
    model = eval_sampler.model
    rng = np.random.default_rng(0)
    prompt = [7, 8, 9, 10]
    greedy: list[int] = []
    for _ in range(6):  # argmax continuation, one padded forward per token (no extra compile)
        padded = np.zeros(WIDTH, np.int32)
        padded[:len(prompt) + len(greedy)] = prompt + greedy
        logits = model.logits(padded, (padded > 0).astype(np.int32))
        greedy.append(int(logits[len(prompt) + len(greedy) - 1].argmax()))
    sequences = [rng.integers(3, 96, size=n).tolist() for n in (40, 9, 23, 3, 17, 1)]
    sequences.append(prompt + greedy)
    masks = [rng.random(len(s)) < 0.7 for s in sequences[:-1]]
    masks.append(np.arange(len(sequences[-1])) >= len(prompt))
    before = likelihood._token_scores._cache_size()
    scores = score_sequences(model, sequences, masks, max_length=WIDTH, batch_size=2)
    for tokens, mask, score in zip(sequences, masks, scores, strict=True):
        scored = np.asarray(mask[1:], bool)
        expected = hand_logprobs(model, tokens)[scored].sum() if len(tokens) > 1 else 0.0
        assert score.tokens == scored.sum()
        assert score.logprob == pytest.approx(expected, abs=ATOL)
    assert scores[-1].greedy and scores[-1].tokens == 6
    assert not scores[0].greedy  # 28 random tokens are not all the argmax
    # 7 sequences (93 tokens) pack into 2 rows of 64 -> one [2, 64] batch: one compile at most
    assert likelihood._token_scores._cache_size() - before <= 1
    again = score_sequences(model, sequences[::-1], masks[::-1], max_length=WIDTH, batch_size=2)
    assert likelihood._token_scores._cache_size() - before <= 1
    assert [s.logprob for s in again[::-1]] == pytest.approx([s.logprob for s in scores], abs=ATOL)


def test_rolling_windows_score_each_token_once_with_most_context():
    tokens = list(range(100, 123))
    loss_mask = [i % 5 != 2 for i in range(23)]
    windows = list(rolling_windows(tokens, loss_mask, 8))
    scored = [t for window, mask in windows for t, m in zip(window, mask, strict=True) if m]
    assert scored == [t for t, m in zip(tokens, loss_mask, strict=True) if m and t != 100]
    assert all(len(window) == 8 for window, _ in windows)  # later windows keep full context
    assert [w[0] for w, _ in windows] == [100, 107, 114, 115]
    assert list(rolling_windows([5], [True], 8)) == [([5], [False])]
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        next(rolling_windows(tokens, loss_mask, 1))


def test_windowed_scores_equal_the_full_document(eval_sampler):
    model = eval_sampler.model
    tokens = np.random.default_rng(1).integers(3, 96, size=150).tolist()
    pieces = list(rolling_windows(tokens, [True] * 150, WIDTH))
    windowed = score_sequences(model, *zip(*pieces, strict=True), max_length=WIDTH, batch_size=2)
    assert len(pieces) == 3 and sum(s.tokens for s in windowed) == 149
    for (window, mask), score in zip(pieces, windowed, strict=True):
        assert score.logprob == pytest.approx(hand_logprobs(model, window)[mask[1:]].sum(),
                                              abs=ATOL)
    with pytest.raises(ValueError, match="sequence 0 has 150 tokens"):
        score_sequences(model, [tokens], [[True] * 150], max_length=WIDTH)


def test_corpus_likelihood_follows_loss_masks(eval_sampler, eval_checkpoint, tmp_path):
    model = eval_sampler.model
    tokenizer = DocumentTokenizer.from_dir(str(eval_checkpoint))
    texts = ["abc123xyz" * 4, "Hello,World!", "q"]  # the first fills a 64-wide row alone
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"prompt": ["2+2="], "response": ["4"]}), tmp_path / "b.parquet")
    report = corpus_likelihood(model, tokenizer, [str(tmp_path / "a.jsonl"),
                                                  str(tmp_path / "b.parquet")], max_length=WIDTH,
                               batch_size=2)
    total, count = 0.0, 0
    for record in [*map(flare_jax.data.parse_record, [{"text": t} for t in texts],
                        ["a"] * 3), flare_jax.data.parse_record(
                            {"prompt": "2+2=", "response": "4"}, "b")]:
        doc = tokenizer(record)
        mask = doc["loss_mask"][1:]
        total += hand_logprobs(model, doc["tokens"].tolist())[mask].sum()
        count += mask.sum()
    assert report.documents == 4 and report.tokens == count
    assert count > 36 + 12 + 1  # text: all but the first token, EOS included; chat: the reply
    assert report.nll == pytest.approx(-total / count, abs=ATOL / count)
    assert report.perplexity == pytest.approx(math.exp(report.nll))
    limited = corpus_likelihood(model, tokenizer, [str(tmp_path / "a.jsonl")], max_length=WIDTH,
                                batch_size=2, limit=1)
    assert limited.documents == 1 and limited.tokens == 36


def test_corpus_errors_name_the_file_and_line(eval_sampler, eval_checkpoint, tmp_path):
    tokenizer = DocumentTokenizer.from_dir(str(eval_checkpoint))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        corpus_likelihood(eval_sampler.model, tokenizer, [str(bad)], max_length=WIDTH)
