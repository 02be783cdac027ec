"""AR decoding with caches: greedy output equals HF ``generate`` on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flare_jax


@pytest.fixture(scope="module")
def models(hf_checkpoint, tmp_path_factory):
    out = []
    for seed, overrides in enumerate([{}, dict(tie_word_embeddings=True, layer_types=[
            "full_attention", "linear_attention", "full_attention", "linear_attention"])]):
        directory, hf_model = hf_checkpoint(f"gen{seed}", seed=10 + seed, **overrides)
        ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp(f"gen{seed}") / "ckpt")
        out.append((hf_model, flare_jax.Sampler.load(ckpt)))
    return out


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=model.config.eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("which", [0, 1])
def test_batched_greedy_equals_hf_generate(models, which):
    """Prompts of different lengths in one left-padded batch; each equals HF run alone."""
    hf_model, sampler = models[which]
    rng = np.random.default_rng(which)
    prompts = [rng.integers(2, hf_model.config.vocab_size, size=n).tolist() for n in (3, 17, 9)]
    results = sampler.generate(prompts, max_new_tokens=20)
    for prompt, result in zip(prompts, results, strict=True):
        expected = hf_greedy(hf_model, prompt, 20)
        assert result.tokens == expected
        assert result.finish_reason == ("eos" if expected[-1] == 1 else "length")
        assert result.forward_passes == len(expected) + 1  # prefill + one pass per token


def test_eos_stops_a_row(models):
    """Make the EOS id the greedy choice after a prompt: that row stops with one token."""
    hf_model, sampler = models[0]
    prompt = [5, 6, 7]
    first = hf_greedy(hf_model, prompt, 1)[0]
    result = sampler.generate([prompt, [9, 10, 11, 12]], max_new_tokens=8, stop_token_ids=[first])
    assert result[0].tokens == [first] and result[0].finish_reason == "eos"
    assert first not in result[1].tokens[:-1]


def test_bad_arguments_raise_clear_errors(models):
    _, sampler = models[0]
    with pytest.raises(ValueError, match="unknown mode"):
        sampler.generate([[1, 2]], mode="beam")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[3], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.generate([[10_000]])
    with pytest.raises(ValueError, match="exceeds the context"):
        sampler.generate([[3] * 500], max_new_tokens=100)
