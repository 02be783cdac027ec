"""The model's FLARE mode: both streams in one pass over a packed ``[clean ; noisy]`` row.

Checked against the other call modes of the same parameters (causal, and denoise after a causal
prefill), and by leakage tests: changing a token a position must not see leaves its logits
bit-identical. fp32 throughout; equivalences hold to 3e-5 on logits of magnitude ~1: different
chunkings of the same recurrence (the FLARE clean stream runs at chunk 8, a causal pass at 64)
reorder fp32 sums, and the chunk's unit-lower inverse amplifies that rounding for correlated
keys (seen: up to 1.03e-5 with the weights transformers 5.24 initialises; a wrong state handoff
or a leaked token moves logits by 1e-2 or more).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flare_jax
from flare_jax.layout import FlareLayout
from flare_jax.model.cache import init_cache

ATOL = 3e-5
BLOCK = 8
MASK_ID = 2


@pytest.fixture(scope="module", params=["hybrid", "all_linear"])
def model(request, hf_checkpoint, tmp_path_factory):
    overrides = {} if request.param == "hybrid" else dict(
        num_hidden_layers=2, layer_types=["linear_attention"] * 2)
    directory, _ = hf_checkpoint(f"flare_{request.param}", seed=21, **overrides)
    ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp("flare") / "ckpt")
    return flare_jax.load(ckpt).module


def packed_row(rng: np.random.Generator, lengths: list[int]):
    """Tokens, noisy copy (about half masked) and segment ids of one row of documents."""
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    clean = rng.integers(3, 96, size=segments.shape)
    noisy = np.where(rng.random(segments.shape) < 0.5, MASK_ID, clean)
    return clean.astype(np.int32), noisy.astype(np.int32), segments.astype(np.int32)


@nnx.jit
def _flare(model, clean, noisy, segments):
    return model.flare(clean, noisy, FlareLayout.from_segments(segments, BLOCK))


@nnx.jit
def _causal(model, tokens, segments):
    return model(tokens, segments)[0]


@nnx.jit
def _prefill_then_denoise(model, prefix, prefix_segments, prefix_positions, block, block_segments,
                          block_positions):
    cache = init_cache(model.config, 1, prefix.shape[1], jnp.float32)
    _, cache = model(prefix, prefix_segments, prefix_positions, cache)
    return model.denoise(block, cache, block_positions, block_segments)


def run_flare(model, clean, noisy, segments):
    out = _flare(model, jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(segments))
    return tuple(np.asarray(x)[0] for x in out)


# Documents start mid-block (lengths 13, 22) and the last block is partial (row of 45 tokens).
LENGTHS = [13, 22, 10]


def test_clean_stream_equals_causal_mode(model):
    clean, noisy, segments = packed_row(np.random.default_rng(0), LENGTHS)
    clean_logits, _ = run_flare(model, clean, noisy, segments)
    causal = _causal(model, jnp.asarray(clean), jnp.asarray(segments))
    np.testing.assert_allclose(clean_logits, np.asarray(causal)[0], atol=ATOL, rtol=0)


def test_noisy_block_equals_denoise_after_prefill(model):
    """Training and inference agree: a noisy block's logits equal `denoise` of that block after a
    causal prefill of its document's clean tokens before the block. Shapes are fixed (the prefix
    left-padded to 48, the block right-padded to 8, padding in segment 0) so one compile serves
    every block; an empty prefix is all padding, so the block starts a new document."""
    clean, noisy, segments = packed_row(np.random.default_rng(1), LENGTHS)
    _, noisy_logits = run_flare(model, clean, noisy, segments)
    starts = np.cumsum([0] + LENGTHS)
    checked = 0
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        for block_start in range(lo - lo % BLOCK, hi, BLOCK):
            begin, end = max(block_start, lo), min(block_start + BLOCK, hi)
            n_prefix, n_block = begin - lo, end - begin
            prefix = np.zeros((1, 48), np.int32)
            prefix_segments = np.zeros((1, 48), np.int32)
            prefix_positions = np.zeros((1, 48), np.int32)
            if n_prefix:
                prefix[0, -n_prefix:] = clean[0, lo:begin]
                prefix_segments[0, -n_prefix:] = 1
                prefix_positions[0, -n_prefix:] = np.arange(n_prefix)
            block = np.zeros((1, BLOCK), np.int32)
            block[0, :n_block] = noisy[0, begin:end]
            block_segments = (np.arange(BLOCK) < n_block).astype(np.int32)[None]
            block_positions = (n_prefix + np.arange(BLOCK))[None].astype(np.int32)
            expected = _prefill_then_denoise(model, *map(jnp.asarray, (
                prefix, prefix_segments, prefix_positions, block, block_segments, block_positions)))
            np.testing.assert_allclose(noisy_logits[begin:end], np.asarray(expected)[0, :n_block],
                                       atol=ATOL, rtol=0, err_msg=f"block at {begin}")
            checked += 1
    assert checked == 8


@pytest.mark.parametrize("model", ["all_linear"], indirect=True)
def test_all_linear_noisy_block_is_causal_over_prefix_and_block(model):
    """Without attention layers there is no intra-block bidirectionality: the noisy block is the
    causal model run on [clean prefix of its document ; the noisy block] alone."""
    clean, noisy, segments = packed_row(np.random.default_rng(2), [21, 24])
    _, noisy_logits = run_flare(model, clean, noisy, segments)
    for begin in (21, 24, 32, 40):  # doc 2 starts at 21, mid-block; later blocks full
        doc_start = 0 if begin < 21 else 21
        end = min((begin // BLOCK + 1) * BLOCK, 45)
        row = np.concatenate([clean[:, doc_start:begin], noisy[:, begin:end]], axis=1)
        expected = _causal(model, jnp.asarray(row), jnp.ones_like(jnp.asarray(row)))
        np.testing.assert_allclose(noisy_logits[begin:end],
                                   np.asarray(expected)[0, begin - doc_start:], atol=ATOL, rtol=0)


def invisible_positions(segments: np.ndarray, query: int, stream: str) -> dict[str, np.ndarray]:
    """Positions of each stream that token ``query`` of ``stream`` must not see."""
    seg = segments[0]
    idx = np.arange(seg.size)
    other_doc = seg != seg[query]
    if stream == "clean":
        return {"clean": other_doc | (idx > query), "noisy": np.ones_like(other_doc)}
    block = query // BLOCK
    return {"clean": other_doc | (idx // BLOCK >= block),
            "noisy": other_doc | (idx // BLOCK != block)}


@pytest.mark.parametrize("stream, query", [("clean", 20), ("noisy", 20), ("noisy", 13),
                                           ("noisy", 44)])
def test_no_leakage(model, stream, query):
    """Perturb every token the query must not see (all at once): its logits stay bit-identical."""
    rng = np.random.default_rng(3)
    clean, noisy, segments = packed_row(rng, LENGTHS)
    base = run_flare(model, clean, noisy, segments)
    hidden = invisible_positions(segments, query, stream)
    clean2 = np.where(hidden["clean"], rng.integers(3, 96, size=clean.shape), clean)
    noisy2 = np.where(hidden["noisy"], rng.integers(3, 96, size=noisy.shape), noisy)
    assert (clean2 != clean).sum() + (noisy2 != noisy).sum() > 10
    after = run_flare(model, clean2, noisy2, segments)
    which = 0 if stream == "clean" else 1
    np.testing.assert_array_equal(after[which][query], base[which][query])
    # and the perturbation is visible elsewhere, so the test can fail
    assert np.abs(after[which] - base[which]).max() > 1e-3
