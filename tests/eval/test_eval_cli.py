"""`flare eval task` and `flare eval likelihood`: a task whose answers are the model's own greedy
outputs scores exactly 1.0, one wrong answer costs exactly 1/n, malformed lines are named."""

from __future__ import annotations

import json

import pytest
from eval_helpers import MAX_NEW, PROMPTS

import flare_jax
from flare_jax.cli import main
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.eval.generation import extract_answer
from flare_jax.eval.likelihood import corpus_likelihood


def run_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def task_file(eval_sampler, tmp_path_factory):
    """Each prompt answered with the number in its greedy AR output."""
    results = eval_sampler.generate(PROMPTS, max_new_tokens=MAX_NEW)
    records = [{"prompt": p, "answer": extract_answer(r.text)}
               for p, r in zip(PROMPTS, results, strict=True)]
    assert all(r["answer"] is not None for r in records)
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_task_accuracy_is_exact(eval_checkpoint, task_file, tmp_path, capsys):
    path, records = task_file
    base = ["eval", "task", str(eval_checkpoint), "--max-new-tokens", str(MAX_NEW)]
    report = run_json([*base, "--task", str(path), "--mode", "ar"], capsys)
    assert report["accuracy"] == 1.0 and report["examples"] == len(records)
    assert report["tokens_per_forward"] <= 1.0 and report["tokens_per_second"] > 0
    wrong = [*records[:3], dict(records[3], answer=records[3]["answer"] + "9"), *records[4:]]
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wrong))
    report = run_json([*base, "--task", str(tmp_path / "wrong.jsonl")], capsys)
    assert report["accuracy"] == 7 / 8


def test_malformed_task_lines_are_named(eval_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"\n')
    assert main(["eval", "task", str(eval_checkpoint), "--task", str(bad)]) == 2
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err


def test_likelihood_command_reports_the_corpus_nll(eval_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc" * 12, "Q7: 42"]))
    report = run_json(["eval", "likelihood", str(eval_checkpoint), "--data", str(corpus),
                       "--max-length", "64", "--batch-size", "2"], capsys)
    expected = corpus_likelihood(flare_jax.load(eval_checkpoint),
                                 DocumentTokenizer.from_dir(str(eval_checkpoint)), [str(corpus)],
                                 max_length=64, batch_size=2)
    assert report == {"checkpoint": str(eval_checkpoint), **expected.as_dict(),
                      "tokens_per_second": report["tokens_per_second"]}
    assert report["documents"] == 2 and report["tokens"] == 36 + 6
