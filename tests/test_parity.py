"""Logit parity of the JAX model with HF torch on tiny random checkpoints, in fp32.

Tolerance: max |logit difference| <= 1e-4. Both sides compute in fp32 with full-precision matmuls;
the residual error comes from different summation orders (chunked vs recurrent deltas, fused vs
unfused softmax), which stay around 1e-6 relative at these sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flare_jax

ATOL = 1e-4

VARIANTS = {
    "base": {},
    "tied": dict(tie_word_embeddings=True),
    "equal_heads_full_first": dict(linear_num_value_heads=2, layer_types=[
        "full_attention", "linear_attention", "linear_attention", "full_attention"]),
    "all_linear_wide": dict(num_hidden_layers=2, linear_num_key_heads=1, linear_num_value_heads=4,
                            linear_key_head_dim=32, layer_types=["linear_attention"] * 2),
}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    out = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        directory, model = hf_checkpoint(name, seed=i, **overrides)
        ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = (model, flare_jax.load(ckpt, dtype="float32"))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(converted, name):
    hf_model, model = converted[name]
    rng = np.random.default_rng(0)
    # 75 tokens: not a multiple of the 64-token chunk of the gated delta rule.
    tokens = rng.integers(2, hf_model.config.vocab_size, size=(2, 75))
    ours = model.logits(tokens)
    theirs = hf_logits(hf_model, tokens)
    assert np.abs(ours - theirs).max() <= ATOL


def test_packed_documents_match_separate_runs(converted):
    """A row packing three documents (segment ids) equals HF run on each document alone."""
    hf_model, model = converted["base"]
    rng = np.random.default_rng(1)
    lengths = [23, 41, 7]
    docs = [rng.integers(2, hf_model.config.vocab_size, size=n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    ours = model.logits(tokens, segments)[0]
    theirs = np.concatenate([hf_logits(hf_model, d[None])[0] for d in docs])
    assert np.abs(ours - theirs).max() <= ATOL
