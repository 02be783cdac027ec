"""FLARE objective: noising statistics and exact loss values against independent numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.layout import FlareLayout
from flare_jax.objective import (
    LossConfig,
    NoiseConfig,
    add_noise,
    flare_loss,
    head_cross_entropy,
    noise_rates,
    token_cross_entropy,
)
from flare_jax.vocab_ce import chunked_cross_entropy

# fp32 everywhere below: values are compared with float64 numpy at rtol 1e-5 (a few fp32 ulps of
# accumulated rounding over at most a few hundred terms; a wrong term changes the result by >1e-2).
RTOL = 1e-5


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# A hand-checked case: 2 documents (segments 1, 2); token 3 is not a loss token (a prompt token).
TOKENS = np.array([[0, 1, 2, 1]])
SEGMENTS = np.array([[1, 1, 2, 2]])
LOSS_MASK = np.array([[1, 1, 1, 0]], bool)
NOISE_MASK = np.array([[0, 1, 1, 0]], bool)
T = np.array([[0.5, 0.5, 0.25, 0.25]], np.float32)
RNG = np.random.default_rng(0)
CLEAN = RNG.normal(size=(1, 4, 3)).astype(np.float32)
NOISY = RNG.normal(size=(1, 4, 3)).astype(np.float32)


def _loss(cfg: LossConfig):
    return flare_loss(
        jnp.asarray(CLEAN), jnp.asarray(NOISY), jnp.asarray(TOKENS), jnp.asarray(NOISE_MASK),
        jnp.asarray(LOSS_MASK), jnp.asarray(SEGMENTS), jnp.asarray(T), cfg,
    )


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("elbo", [False, True])
def test_exact_small_case(shift, elbo):
    lc, ln = _log_softmax(CLEAN)[0], _log_softmax(NOISY)[0]
    # AR: only 0 -> 1 is supervised (1 -> 2 crosses documents, 2 -> 3 targets a prompt token).
    ar = [-lc[0, 1]]
    if shift:
        # Masked tokens 1 and 2: token 1 is predicted by noisy position 0 (same document); token 2
        # starts document 2, so it has no predictor.
        diff, t = [-ln[0, 1]], [0.5]
    else:
        diff, t = [-ln[1, 1], -ln[2, 2]], [0.5, 0.25]
    weighted = [d / ti for d, ti in zip(diff, t, strict=True)] if elbo else diff
    cfg = LossConfig(ar_weight=0.5, diffusion_weight=2.0, logit_shift=shift, elbo_weighting=elbo)
    total, metrics = _loss(cfg)
    expected = (0.5 * sum(ar) + 2.0 * sum(weighted)) / (0.5 * len(ar) + 2.0 * len(diff))
    np.testing.assert_allclose(total, expected, rtol=RTOL)
    np.testing.assert_allclose(metrics["ar_loss"], np.mean(ar), rtol=RTOL)
    np.testing.assert_allclose(metrics["diffusion_loss"], np.mean(diff), rtol=RTOL)
    assert metrics["ar_tokens"] == 1 and metrics["diffusion_tokens"] == len(diff)
    assert ("diffusion_elbo_loss" in metrics) == elbo
    if elbo:
        np.testing.assert_allclose(metrics["diffusion_elbo_loss"], np.mean(weighted), rtol=RTOL)


def test_ar_only_equals_plain_causal_cross_entropy():
    rng = np.random.default_rng(1)
    batch, length, vocab = 2, 9, 11
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(batch, length))
    lp = _log_softmax(logits)
    expected = -np.mean(np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1))
    ones = jnp.ones((batch, length), jnp.int32)
    noisy = jnp.asarray(rng.normal(size=(batch, length, vocab)), jnp.float32)
    total, metrics = flare_loss(
        jnp.asarray(logits), noisy, jnp.asarray(tokens), ones.astype(bool), ones, ones,
        jnp.full((batch, length), 0.5), LossConfig(diffusion_weight=0.0),
    )
    np.testing.assert_allclose(total, expected, rtol=RTOL)
    assert metrics["ar_tokens"] == batch * (length - 1)
    assert metrics["diffusion_tokens"] == batch * length  # still reported, weight 0


def test_logit_shift_alignment():
    # Noisy logits that put all mass on the *next* token: zero loss with shift, large without.
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    noisy = 30.0 * jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), 6)
    ones = jnp.ones_like(tokens)
    args = (noisy, noisy, tokens, ones.astype(bool), ones, ones, jnp.ones((1, 5)))
    _, shifted = flare_loss(*args, LossConfig(logit_shift=True))
    _, plain = flare_loss(*args, LossConfig(logit_shift=False))
    assert shifted["diffusion_tokens"] == 4 and plain["diffusion_tokens"] == 5
    assert shifted["diffusion_loss"] < 1e-6
    assert plain["diffusion_loss"] > 10.0


def test_gradients_finite_and_zero_off_supervision():
    cfg = LossConfig(elbo_weighting=True)
    grad_fn = jax.grad(lambda c, n: _loss_from(c, n, cfg), argnums=(0, 1))
    g_clean, g_noisy = grad_fn(jnp.asarray(CLEAN, jnp.bfloat16), jnp.asarray(NOISY, jnp.bfloat16))
    assert g_clean.dtype == jnp.bfloat16
    for g in (g_clean, g_noisy):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    # Only clean position 0 (AR) and noisy positions 1, 2 (masked) receive gradient.
    touched = lambda g: np.abs(np.asarray(g, np.float32)).sum(-1)[0] > 0  # noqa: E731
    np.testing.assert_array_equal(touched(g_clean), [True, False, False, False])
    np.testing.assert_array_equal(touched(g_noisy), [False, True, True, False])


def _loss_from(clean, noisy, cfg):
    total, _ = flare_loss(
        clean, noisy, jnp.asarray(TOKENS), jnp.asarray(NOISE_MASK), jnp.asarray(LOSS_MASK),
        jnp.asarray(SEGMENTS), jnp.asarray(T), cfg,
    )
    assert total.dtype == jnp.float32
    return total


BATCH, LENGTH, BLOCK = 64, 96, 16


@jax.jit
def _noise_many(keys, tokens, maskable):
    layout = FlareLayout.from_segments(jnp.ones_like(tokens), BLOCK)
    cfg = NoiseConfig(mask_token_id=99, eps=0.1)
    return jax.vmap(lambda k: add_noise(k, tokens, layout, maskable, cfg))(keys)


def test_prompt_and_padding_never_masked_over_seeds():
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 50, size=(BATCH, LENGTH)), jnp.int32)
    maskable = jnp.asarray(rng.random((BATCH, LENGTH)) < 0.6)
    noisy, mask, rate = _noise_many(jax.random.split(jax.random.key(0), 8), tokens, maskable)
    assert not np.any(np.asarray(mask) & ~np.asarray(maskable)[None])
    np.testing.assert_array_equal(np.where(mask, 99, tokens[None]), noisy)
    # Per-block t: constant inside each block, within [eps, 1).
    per_block = np.asarray(rate).reshape(8, BATCH, LENGTH // BLOCK, BLOCK)
    assert np.all(per_block == per_block[..., :1])
    assert per_block.min() >= 0.1 and per_block.max() < 1.0


@pytest.mark.parametrize("per,position_dependent", [("block", False), ("sequence", True)])
def test_masking_rate_matches_t(per, position_dependent):
    layout = FlareLayout.from_segments(jnp.ones((BATCH, LENGTH), jnp.int32), BLOCK)
    cfg = NoiseConfig(mask_token_id=0, eps=0.05, per=per, position_dependent=position_dependent)
    key = jax.random.key(3)
    tokens = jnp.ones((BATCH, LENGTH), jnp.int32)
    noise = jax.jit(add_noise, static_argnums=4)
    _, mask, rate = noise(key, tokens, layout, jnp.ones((BATCH, LENGTH), bool), cfg)
    mask, rate = np.asarray(mask), np.asarray(rate, np.float64)
    # The number of masked tokens is a sum of independent Bernoulli(rate): within 5 sigma.
    sigma = np.sqrt(np.sum(rate * (1 - rate)))
    assert abs(mask.sum() - rate.sum()) < 5 * sigma
    blocks = rate.reshape(BATCH, LENGTH // BLOCK, BLOCK)
    if per == "sequence":
        flat = np.asarray(noise_rates(key, layout, dataclasses.replace(cfg, position_dependent=False)))
        ramp = np.asarray(noise_rates(key, layout, cfg)).reshape(blocks.shape)
        t = flat[:, :1]
        assert np.all(flat == t)  # one t per row
        # The ramp keeps each block's mean rate at the row's t, rises, and stays in [0, 1].
        np.testing.assert_allclose(ramp.mean(-1), t.repeat(LENGTH // BLOCK, 1), rtol=1e-5)
        assert np.all(np.diff(ramp, axis=-1) >= 0) and ramp.min() >= 0 and ramp.max() <= 1
        mid = (t[:, 0] >= 0.3) & (t[:, 0] <= 0.7)
        assert np.all(ramp[mid, :, -1] > ramp[mid, :, 0] + 0.5)
    else:
        assert np.all(blocks == blocks[..., :1])
        assert len(np.unique(blocks[..., 0])) == BATCH * LENGTH // BLOCK


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: NoiseConfig(mask_token_id=-1), "mask_token_id"),
        (lambda: NoiseConfig(mask_token_id=1, eps=1.0), "eps"),
        (lambda: NoiseConfig(mask_token_id=1, per="token"), "per"),
        (lambda: NoiseConfig(mask_token_id=1, position_dependent=1), "position_dependent"),
        (lambda: LossConfig(ar_weight=-1.0), "ar_weight"),
        (lambda: LossConfig(ar_weight=0, diffusion_weight=0), "both 0"),
        (lambda: LossConfig(logit_shift="yes"), "logit_shift"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="noise_mask"):
        flare_loss(
            jnp.asarray(CLEAN), jnp.asarray(NOISY), jnp.asarray(TOKENS), jnp.ones((1, 3), bool),
            jnp.asarray(LOSS_MASK), jnp.asarray(SEGMENTS), jnp.asarray(T), LossConfig(),
        )


# Chunked-vocabulary cross-entropy (flare_jax.vocab_ce) against the full-logits path, fp32 with
# full-precision matmuls: the chunked logsumexp adds the exponentials in another order and rescales
# them per chunk, so values and gradients differ by a few fp32 ulps of O(1-10) numbers (seen:
# 3e-6); a column counted twice or missed at a chunk boundary changes them by more than 1e-2.
CE_ATOL = 1e-5
N_TOKENS, HIDDEN, VOCAB = 37, 16, 103  # 103 = 3 x 32 + 7: the last chunk of 32 overlaps


def _head_case(vocab_major: bool):
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(N_TOKENS, HIDDEN)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(VOCAB, HIDDEN) if vocab_major else (HIDDEN, VOCAB)),
                         jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, N_TOKENS), jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=N_TOKENS), jnp.float32)
    return hidden, weight, targets, cotangent


def _dense_logits(hidden, weight, vocab_major):
    head = weight.T if vocab_major else weight
    return jnp.einsum("...h,hv->...v", hidden, head, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [32, 256])  # 256 > V: a single chunk of the whole vocabulary
def test_chunked_cross_entropy_equals_dense(vocab_major, chunk):
    hidden, weight, targets, cotangent = _head_case(vocab_major)

    def dense(h, w):
        return token_cross_entropy(_dense_logits(h, w, vocab_major), targets)

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, vocab_major=vocab_major, chunk_size=chunk)

    expected, expected_vjp = jax.vjp(dense, hidden, weight)
    got, got_vjp = jax.jit(lambda h, w: jax.vjp(chunked, h, w))(hidden, weight)
    assert got.dtype == jnp.float32 and got.shape == (N_TOKENS,)
    np.testing.assert_allclose(got, expected, atol=CE_ATOL, rtol=0)
    for g, e in zip(got_vjp(cotangent), expected_vjp(cotangent), strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=CE_ATOL, rtol=0)


@pytest.mark.parametrize("head", [{"vocab_chunk": 32}, {"token_chunk": 4}],
                         ids=["vocab_chunks", "token_chunks"])
@pytest.mark.parametrize("logit_shift", [True, False])
def test_flare_loss_from_hidden_states_equals_logits(head, logit_shift):
    # The objective over [B, L, hidden] states through head_cross_entropy (AR and diffusion
    # terms, shifted or not, ELBO weights) equals it over the logits: value, gradients, metrics.
    rng = np.random.default_rng(4)
    shape = (2, 9)
    clean, noisy = (jnp.asarray(rng.normal(size=(*shape, HIDDEN)), jnp.float32) for _ in range(2))
    weight = jnp.asarray(rng.normal(size=(VOCAB, HIDDEN)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, VOCAB, shape), jnp.int32)
    rest = (jnp.asarray(rng.random(shape) < 0.5), jnp.ones(shape, bool),
            jnp.asarray(np.repeat([[1] * 5 + [2] * 4], 2, axis=0)), jnp.full(shape, 0.4))
    cfg = LossConfig(logit_shift=logit_shift, elbo_weighting=True)

    def from_logits(c, n, w):
        return flare_loss(_dense_logits(c, w, True), _dense_logits(n, w, True), tokens, *rest,
                          cfg)

    def from_hidden(c, n, w):
        return flare_loss(c, n, tokens, *rest, cfg, head_cross_entropy(w, True, **head))

    expected = jax.value_and_grad(from_logits, argnums=(0, 1, 2), has_aux=True)(
        clean, noisy, weight)
    got = jax.value_and_grad(from_hidden, argnums=(0, 1, 2), has_aux=True)(clean, noisy, weight)
    assert set(got[0][1]) == set(expected[0][1])
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, atol=CE_ATOL, rtol=0)


def test_head_cross_entropy_needs_a_chunk():
    with pytest.raises(ValueError, match="needs vocab_chunk or token_chunk > 0"):
        head_cross_entropy(jnp.zeros((VOCAB, HIDDEN)), True)
    with pytest.raises(ValueError, match="'bfloat16' needs token_chunk > 0"):
        head_cross_entropy(jnp.zeros((VOCAB, HIDDEN)), True, vocab_chunk=32,
                           logits_dtype="bfloat16")
