"""`flare data score` and `flare data self-distill` on a tiny random checkpoint: parity of the
batched scores with unbatched logits, the chat split, resume after interruption, malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import flare_jax
from flare_jax.cli import main
from flare_jax.convert.synthetic import write_char_tokenizer
from flare_jax.data import DocumentTokenizer, Record, RecordError, open_source, parse_record
from flare_jax.data.tools import (
    DocumentScorer,
    GenerationSettings,
    parse_prompt,
    score_file,
    self_distill,
)
from flare_jax.data.tools.io import read_rows

ALPHABET = list("abcdefghijklmnopqrstuvwxyz .,?!\n")
RECORDS = [{"text": "hello world"}, {"prompt": "hi there", "response": "hello, friend."},
           {"text": "abc " * 12}, {"text": ""},
           {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "why?"},
                         {"role": "assistant", "content": "because."}]}]
PROMPTS = [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "what is it?"}]},
           {"prompt": "say abc"}]
SETTINGS = GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def seed(hf_checkpoint, tmp_path_factory):
    """(checkpoint dir, fp32 model, document tokenizer) of a tiny random model with a char
    tokenizer."""
    directory, _ = hf_checkpoint()
    ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp("tools") / "ckpt")
    write_char_tokenizer(ckpt, ALPHABET)
    return ckpt, flare_jax.load(ckpt), DocumentTokenizer.from_dir(str(ckpt))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_match_unbatched_logits(seed, tmp_path):
    ckpt, model, tokenizer = seed
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    rows = read_rows(score_file(data, model, tokenizer, batch_size=3, chunk_size=4))
    assert (tmp_path / "d.scores.jsonl").is_file() and [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    source = open_source(str(data))
    for row, i in zip(rows, range(len(source)), strict=True):
        doc = tokenizer(source[i])
        n = len(doc["tokens"])
        # Reference: the document alone in a row of 64 (one compile), padding in segment 0.
        logits = model.logits(np.pad(doc["tokens"], (0, 64 - n)),
                              (np.arange(64) < n).astype(np.int32))[:n].astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = logp[np.arange(n - 1), doc["tokens"][1:]]
        assert row["length"] == len(doc["tokens"]) and row["scored_tokens"] == target.size
        # fp32 forward in a padded batch vs alone: only summation order differs (~1e-6).
        if target.size:
            np.testing.assert_allclose(row["mean_logprob"], target.mean(), rtol=0, atol=2e-5)
            np.testing.assert_allclose(row["perplexity"], np.exp(-target.mean()), rtol=5e-5)
        else:  # the empty text: only the EOS, nothing is predicted
            assert row["mean_logprob"] is None and row["perplexity"] is None
        if row["chat"]:
            response = doc["loss_mask"][1:]
            assert row["response_tokens"] == response.sum() > 0
            assert row["prompt_tokens"] == (~response).sum() > 0
            np.testing.assert_allclose(row["response_mean_logprob"], target[response].mean(),
                                       atol=2e-5)
            np.testing.assert_allclose(row["prompt_mean_logprob"], target[~response].mean(),
                                       atol=2e-5)
        else:
            assert row["response_tokens"] is None and row["prompt_mean_logprob"] is None
    assert [r["chat"] for r in rows] == [False, True, False, False, True]

    # A document over max_length is scored on its first max_length tokens.
    long_record = Record(text="abc " * 20)
    scorer = DocumentScorer(model, tokenizer, batch_size=3, max_length=64)
    (long_doc,) = scorer.score([long_record])
    assert long_doc["truncated"] and long_doc["scored_tokens"] == 63 and long_doc["length"] == 81
    logits = model.logits(tokenizer(long_record)["tokens"][:64]).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = logp[np.arange(63), tokenizer(long_record)["tokens"][1:64]]
    np.testing.assert_allclose(long_doc["mean_logprob"], target.mean(), atol=2e-5)


def test_score_resumes_after_interruption(seed, tmp_path, monkeypatch):
    ckpt, model, tokenizer = seed
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    full = read_rows(score_file(data, model, tokenizer, tmp_path / "full.jsonl", batch_size=3,
                                chunk_size=2))
    calls = []
    original = DocumentScorer.score

    def interrupted(self, records):
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(DocumentScorer, "score", interrupted)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        score_file(data, model, tokenizer, out, batch_size=3, chunk_size=2)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / ".resumed.parquet.parts").iterdir()) == \
        ["meta.json", "part-000000.jsonl"]
    with pytest.raises(ValueError, match="other settings.*chunk_size"):
        score_file(data, model, tokenizer, out, batch_size=3, chunk_size=3)
    calls.clear()
    monkeypatch.setattr(DocumentScorer, "score", lambda self, records: (
        calls.append(len(records)), original(self, records))[1])
    score_file(data, model, tokenizer, out, batch_size=3, chunk_size=2)
    assert calls == [2, 1]  # only chunks 1 and 2 were scored again
    assert read_rows(out) == full
    assert not (tmp_path / ".resumed.parquet.parts").exists()
    with pytest.raises(FileExistsError):
        score_file(data, model, tokenizer, out, chunk_size=2)


def test_score_malformed_record_writes_nothing(seed, tmp_path, capsys):
    ckpt, model, tokenizer = seed
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: 'messages' has no assistant turn"):
        score_file(data, model, tokenizer)
    assert main(["data", "score", str(data), "--checkpoint", str(ckpt)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_score_parquet(seed, tmp_path, capsys):
    ckpt, model, tokenizer = seed
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:2])
    assert main(["data", "score", str(data), "--checkpoint", str(ckpt), "--format", "parquet",
                 "--dtype", "float32", "--batch-size", "3"]) == 0
    assert "d.scores.parquet" in capsys.readouterr().out
    expected = read_rows(score_file(data, model, tokenizer, tmp_path / "api.jsonl", batch_size=3))
    got = read_rows(tmp_path / "d.scores.parquet")
    assert [r["length"] for r in got] == [r["length"] for r in expected]
    np.testing.assert_allclose([r["mean_logprob"] for r in got],
                               [r["mean_logprob"] for r in expected], atol=1e-6)


def test_self_distill_records_and_resume(seed, tmp_path, monkeypatch):
    ckpt, model, tokenizer = seed
    sampler = flare_jax.Sampler(model, tokenizer.tokenizer)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rows = read_rows(self_distill(prompts, sampler, tokenizer, tmp_path / "full.jsonl",
                                  settings=SETTINGS, batch_size=2, chunk_size=2))
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r.get("prompt") for r in rows] == ["hi", None, "say abc"]
    seeds = [r["generation"]["seed"] for r in rows]  # one per batch
    assert seeds[0] == seeds[1] != seeds[2]
    for row in rows:
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
        assert 1 <= row["response_tokens"] <= SETTINGS.max_new_tokens
        assert row["generation"]["temperature"] == 0.8 and row["generation"]["mode"] == "ar"
        assert row["generation"]["checkpoint"] == str(ckpt)
        doc = tokenizer(parse_record(row, "row"))  # usable by the training pipeline
        assert doc["loss_mask"].any()
    # The recorded seed reproduces the first batch (prompts 0 and 1) with the sampler directly.
    stop = [1, tokenizer.tokenizer.token_to_id("<|im_end|>")]
    batch = [tokenizer.tokenizer.encode(tokenizer.template.render(parse_prompt(p, "p")[0], True),
                                        add_special_tokens=False).ids for p in PROMPTS[:2]]
    direct = sampler.generate(batch, max_new_tokens=6, temperature=0.8, top_p=0.9,
                              seed=rows[0]["generation"]["seed"], stop_token_ids=stop)
    assert [r["response_tokens"] for r in rows[:2]] == [len(d.tokens) for d in direct]
    assert [r["response"] for r in rows[:2]] == [
        tokenizer.tokenizer.decode([t for t in d.tokens if t not in stop]) for d in direct]
    assert [r["finish_reason"] for r in rows[:2]] == [d.finish_reason for d in direct]

    assert main(["data", "self-distill", str(prompts), "--checkpoint", str(ckpt), "--output",
                 str(tmp_path / "cli.jsonl"), "--max-new-tokens", "6", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3", "--batch-size", "2", "--chunk-size", "2",
                 "--dtype", "float32"]) == 0
    assert read_rows(tmp_path / "cli.jsonl") == rows

    calls = []
    generate = sampler.generate

    def interrupted(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(sampler, "generate", interrupted)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        self_distill(prompts, sampler, tokenizer, out, settings=SETTINGS, batch_size=2,
                     chunk_size=2)
    assert not out.exists()
    calls.clear()
    self_distill(prompts, sampler, tokenizer, out, settings=SETTINGS, batch_size=2, chunk_size=2)
    assert len(calls) == 1  # only the second chunk was generated again
    assert read_rows(out) == [{**row, "prompt": row.get("prompt")} for row in rows]


def test_self_distill_malformed_prompt_writes_nothing(seed, tmp_path, capsys):
    ckpt, model, tokenizer = seed
    sampler = flare_jax.Sampler(model, tokenizer.tokenizer)
    bad = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "ok"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(RecordError, match=r"p\.jsonl:2: the last turn is the assistant's"):
        self_distill(bad, sampler, tokenizer, tmp_path / "out.jsonl")
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["data", "self-distill", str(bad), "--checkpoint", str(ckpt), "--output",
                 str(tmp_path / "out.jsonl")]) == 2
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a" * 600}])
    with pytest.raises(ValueError, match=r"long\.jsonl:1: the prompt has .* exceeds the context"):
        self_distill(too_long, sampler, tokenizer, tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl", "p.jsonl"]
