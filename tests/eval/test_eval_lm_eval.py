"""The lm-evaluation-harness adapter, run through ``lm_eval.simple_evaluate`` on local-file tasks
(no downloads): log-likelihoods equal a hand computation from ``model.logits``; generate_until
returns the configured mode's text cut at the stop string."""

from __future__ import annotations

import json

import lm_eval
import pytest
from eval_helpers import ATOL, FIELDS, MAX_NEW, PROMPTS, TASK, hand_logprobs
from lm_eval.tasks import TaskManager

from flare_jax.eval.likelihood import score_sequences
from flare_jax.eval.lm_eval_adapter import FlareJaxLM

# the five choices pack into one row of 33..64 tokens: the [2, 64] shape of the other tests
DOCS = [{"question": "ab1 ab1", "choices": ["xyz", "Q7"], "label": 0, "text": "hello world 42"},
        {"question": "zz zz", "choices": ["k=3", "pq!", "w"], "label": 2, "text": "abc" * 30}]


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    questions = [{**DOCS[i % 2], "question": p} for i, p in enumerate(PROMPTS)]
    for name, docs in (("mc", DOCS), ("rolling", DOCS), ("gen", questions)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, output_type in (("mc", "multiple_choice"), ("rolling", "loglikelihood_rolling"),
                              ("gen", "generate_until")):
        fields = FIELDS[output_type].replace("{stop}", "$").replace("{max_new}", str(MAX_NEW))
        (root / f"flare_{name}.yaml").write_text(TASK.format(
            name=f"flare_{name}", data=root / f"{name}.jsonl", cache=root / "hf_cache",
            output_type=output_type, fields=fields))
    return TaskManager(include_path=str(root), include_defaults=False)


def evaluate(task_manager, checkpoint, task: str, batch_size: int, **model_args) -> list[dict]:
    out = lm_eval.simple_evaluate(model="flare-jax",
                                  model_args={"checkpoint": str(checkpoint), **model_args},
                                  tasks=[task], task_manager=task_manager, batch_size=batch_size,
                                  bootstrap_iters=0, log_samples=True)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_equal_hand_computation(task_manager, eval_checkpoint, eval_sampler):
    model, tokenizer = eval_sampler.model, eval_sampler.tokenizer
    samples = evaluate(task_manager, eval_checkpoint, "flare_mc", 2, max_length=64)
    for sample in samples:
        doc = sample["doc"]
        for choice, (resp,) in zip(doc["choices"], sample["resps"], strict=True):
            context = tokenizer.encode(doc["question"], add_special_tokens=False).ids
            whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False).ids
            mask = [i >= len(context) for i in range(len(whole))]
            logprob, greedy = resp
            assert logprob == pytest.approx(hand_logprobs(model, whole)[mask[1:]].sum(), abs=ATOL)
            assert greedy == score_sequences(model, [whole], [mask], max_length=64,
                                             batch_size=2)[0].greedy
    rolling = evaluate(task_manager, eval_checkpoint, "flare_rolling", 2, max_length=64)
    for sample in rolling:
        tokens = [1, *tokenizer.encode(sample["doc"]["text"], add_special_tokens=False).ids]
        (total,) = sample["resps"][0]
        if len(tokens) <= 64:
            assert total == pytest.approx(hand_logprobs(model, tokens).sum(), abs=ATOL)
        else:  # 91 tokens: a full first window, then the last 27 tokens with 37 of context
            expected = hand_logprobs(model, tokens[:64]).sum()
            expected += hand_logprobs(model, tokens[-64:])[-27:].sum()
            assert total == pytest.approx(expected, abs=ATOL)


def test_generate_until_in_diffusion_mode(task_manager, eval_checkpoint, eval_sampler):
    """The harness's requests reach the sampler in the configured mode with its stop string."""
    samples = evaluate(task_manager, eval_checkpoint, "flare_gen", 8, mode="diffusion",
                       block_size=4, threshold=0.5)
    settings = dict(max_new_tokens=MAX_NEW, block_size=4, threshold=0.5)
    diffusion = eval_sampler.generate(PROMPTS, mode="diffusion", **settings)
    assert [s["resps"][0][0] for s in samples] == [r.text.split("$")[0] for r in diffusion]
    assert any("$" in r.text for r in diffusion)  # the stop string cut at least one output
    ar = eval_sampler.generate(PROMPTS, max_new_tokens=MAX_NEW)  # (compiled by the CLI tests)
    assert [r.text for r in ar] != [r.text for r in diffusion]  # so the mode did reach it


def test_chat_template_and_bad_arguments(eval_checkpoint):
    lm = FlareJaxLM(str(eval_checkpoint), max_length=8)
    rendered = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>user\nhi") and rendered.endswith("assistant\n")
    with pytest.raises(ValueError, match="does not fit max_length=8"):
        lm._loglikelihood_tokens([(None, [5], list(range(5, 13)))])
