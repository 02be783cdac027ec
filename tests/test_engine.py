"""The batched engine: slots refilled from a queue give each request exactly what a lone static
batch gives it (AR, verified, and diffusion, whose carried first denoising step a refill drops);
tokens stream; stop strings and budgets end requests; chat prompts render."""

from __future__ import annotations

import dataclasses
import string

import numpy as np
import pytest

import flare_jax
from flare_jax.convert.synthetic import write_char_tokenizer
from flare_jax.data.chat import chatml

ALPHABET = string.ascii_letters + string.digits + string.punctuation[:29]  # 91 + 5 special = 96


@pytest.fixture(scope="module")
def sampler(hf_checkpoint, tmp_path_factory):
    directory, _ = hf_checkpoint("engine", seed=41)
    ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp("engine") / "ckpt")
    model = flare_jax.load(ckpt)
    model = flare_jax.Model(dataclasses.replace(model.config, mask_token_id=2), model.module)
    tokenizer = write_char_tokenizer(tmp_path_factory.mktemp("tok"), ALPHABET)
    assert tokenizer.get_vocab_size() == model.config.vocab_size
    return flare_jax.Sampler(model, tokenizer, chat_template=chatml)


@pytest.mark.parametrize("mode", ["ar", "verified", "diffusion"])
def test_refilled_slots_equal_lone_requests(sampler, mode):
    rng = np.random.default_rng(5)
    requests = [(rng.integers(5, 96, size=n).tolist(), budget)
                for n, budget in [(3, 9), (20, 4), (7, 15), (12, 6), (2, 11), (9, 3), (5, 8)]]
    settings = dict(block_size=4, threshold=0.5)
    engine = flare_jax.Engine(sampler, num_slots=3, max_length=64, mode=mode, stop_token_ids=[],
                              **settings)
    ids = [engine.submit(prompt, max_new_tokens=budget) for prompt, budget in requests]
    streamed: dict[int, list[int]] = {i: [] for i in ids}
    results = engine.run(on_tokens=lambda rid, toks: streamed[rid].extend(toks))
    longest = max(budget for _, budget in requests)
    for rid, (prompt, budget) in zip(ids, requests, strict=True):
        # alone with the largest budget (one compile), cut to this request's budget; verified
        # greedy equals AR greedy
        alone = sampler.generate([prompt], mode="diffusion" if mode == "diffusion" else "ar",
                                 max_new_tokens=longest, stop_token_ids=[], **settings)[0]
        assert results[rid].tokens == alone.tokens[:budget]
        assert streamed[rid] == results[rid].tokens
        assert results[rid].finish_reason == "length"


def test_stop_string_and_stop_token(sampler):
    free = sampler.generate(["abc"], max_new_tokens=12, stop_token_ids=[])[0]
    marker = free.text[4:6]
    engine = flare_jax.Engine(sampler, num_slots=2, max_length=64, stop_token_ids=[])
    rid = engine.submit("abc", max_new_tokens=12, stop=[marker])
    result = engine.run()[rid]
    assert marker not in result.text and free.text.startswith(result.text)
    assert result.finish_reason == "stop" and len(result.tokens) < 12
    assert sampler.generate(["abc"], max_new_tokens=12, stop=[marker],
                            stop_token_ids=[])[0].tokens == result.tokens
    stop_id = free.tokens[3]
    engine = flare_jax.Engine(sampler, num_slots=1, max_length=64, stop_token_ids=[stop_id])
    rid = engine.submit("abc", max_new_tokens=12)
    result = engine.run()[rid]
    assert result.tokens == free.tokens[:free.tokens.index(stop_id) + 1]
    assert result.finish_reason == "eos"


def test_chat_prompts_use_the_template(sampler):
    messages = [{"role": "user", "content": "hi"}]
    via_chat = sampler.generate([messages], chat=True, max_new_tokens=4, stop_token_ids=[])[0]
    rendered = chatml([flare_jax.data.records.Message("user", "hi")], True)
    # the character tokenizer maps unknown chat markup characters to <pad>, consistently
    direct = sampler.generate([rendered], max_new_tokens=4, stop_token_ids=[])[0]
    assert via_chat.tokens == direct.tokens
    with pytest.raises(ValueError, match="chat prompt 0 must be"):
        sampler.generate([[{"content": "no role"}]], chat=True)


def test_engine_rejects_requests_that_do_not_fit(sampler):
    engine = flare_jax.Engine(sampler, num_slots=1, max_length=32)
    with pytest.raises(ValueError, match="max_length is 32"):
        engine.submit([5] * 20, max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.submit([])
