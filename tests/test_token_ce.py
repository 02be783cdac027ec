"""Position-chunked cross-entropy through the LM head (flare_jax.token_ce) against full logits:
the weighted sum, the per-token values and the gradients of hidden states, head and token
weights, for both head layouts and chunkings that do and do not divide the rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.objective import token_cross_entropy
from flare_jax.token_ce import weighted_cross_entropy

# fp32 with full-precision matmuls on both sides: the logits are the same dot products, the
# logsumexp runs over the same columns in one reduction, so values and gradients agree to a few
# fp32 ulps of O(1-10) numbers (seen: 1e-6); a column or token counted twice or missed, or a
# wrong cotangent scale, moves them by more than 1e-2.
ATOL = 1e-5
ROWS, LENGTH, HIDDEN, VOCAB = 3, 11, 16, 53


def _case(vocab_major: bool):
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(ROWS, LENGTH, HIDDEN)), jnp.float32)
    shape = (VOCAB, HIDDEN) if vocab_major else (HIDDEN, VOCAB)
    weight = jnp.asarray(0.5 * rng.normal(size=shape), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (ROWS, LENGTH)), jnp.int32)
    token_weights = jnp.asarray(rng.random((ROWS, LENGTH)) * (rng.random((ROWS, LENGTH)) < 0.7),
                                jnp.float32)
    return hidden, weight, targets, token_weights


def _dense(hidden, weight, targets, token_weights, vocab_major):
    head = weight.T if vocab_major else weight
    logits = jnp.einsum("blh,hv->blv", hidden, head, precision=jax.lax.Precision.HIGHEST)
    ce = token_cross_entropy(logits, targets)
    return jnp.sum(token_weights * ce), ce


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
# 3 tokens: one position per row and step; 12: 4 positions, the last step padded (11 = 2 x 4 + 3);
# 1000: the whole row in one step
@pytest.mark.parametrize("chunk_tokens", [3, 12, 1000])
# the GPU path: the row-softmax kernel (interpret mode), its offsets the targets' logits
@pytest.mark.parametrize("backend", ["auto", "gpu_interpret"])
def test_equals_full_logits(vocab_major, chunk_tokens, backend):
    hidden, weight, targets, token_weights = _case(vocab_major)

    def ours(h, w, tw):
        return weighted_cross_entropy(h, w, targets, tw, vocab_major=vocab_major,
                                      chunk_tokens=chunk_tokens, backend=backend)

    (total, ce), expected = jax.jit(ours)(hidden, weight, token_weights), _dense(
        hidden, weight, targets, token_weights, vocab_major)
    assert ce.shape == (ROWS, LENGTH) and ce.dtype == jnp.float32
    np.testing.assert_allclose(total, expected[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(ce, expected[1], atol=ATOL, rtol=0)
    # a cotangent other than 1 must scale every gradient formed in the forward pass
    got = jax.jit(jax.grad(lambda *a: -2.5 * ours(*a)[0], argnums=(0, 1, 2)))(
        hidden, weight, token_weights)
    want = jax.grad(lambda *a: -2.5 * _dense(*a[:2], targets, a[2], vocab_major)[0],
                    argnums=(0, 1, 2))(hidden, weight, token_weights)
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, atol=ATOL, rtol=0)


def test_per_token_values_carry_no_gradient():
    hidden, weight, targets, token_weights = _case(True)
    grad = jax.grad(lambda h: jnp.sum(weighted_cross_entropy(
        h, weight, targets, token_weights, vocab_major=True)[1]))(hidden)
    assert not np.any(np.asarray(grad))


def test_bf16_hidden_states_give_bf16_gradients_near_fp32():
    # bf16 matmul operands (fp32 accumulation, fp32 softmax): within a few bf16 roundings
    # (2^-8 = 3.9e-3 relative each) of the fp32 result.
    hidden, weight, targets, token_weights = _case(False)

    def loss(h, w):
        return weighted_cross_entropy(h, w, targets, token_weights, vocab_major=False,
                                      chunk_tokens=12)[0]

    (v16, g16), (v32, g32) = (jax.value_and_grad(loss, argnums=(0, 1))(hidden.astype(dt), weight)
                              for dt in (jnp.bfloat16, jnp.float32))
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    np.testing.assert_allclose(v16, v32, rtol=2e-2)
    for a, b in zip(g16, g32, strict=True):
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
        assert err < 3e-2


@pytest.mark.parametrize("backend", ["auto", "gpu_interpret"])
def test_confident_predictions_keep_their_small_gradients_in_bf16(backend):
    # each hidden state along its target's (orthonormal) embedding: the target's logit is 12
    # above the others', p_target ~ 1 - 3e-4, so d_logits at the target is w (p - 1) ~ -3e-4 w.
    # Formed in fp32 and rounded once (the target column of the exponentials), d_hidden stays
    # within a few bf16 roundings of the fp32 gradient at the same (bf16) hidden states (seen:
    # 0.5% and 1.0%); the target's softmax term rounded to bf16 before the 1 is taken off would
    # be off by 2^-9 w, about 98% of the largest gradient.
    rows, length, hidden_size, vocab = 3, 11, 64, 53
    rng = np.random.default_rng(7)
    weight = jnp.asarray(np.linalg.qr(rng.normal(size=(hidden_size, hidden_size)))[0][:vocab],
                         jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32)
    token_weights = jnp.asarray(rng.random((rows, length)), jnp.float32)
    hidden = (12.0 * weight[targets] + 0.05 * rng.normal(size=(rows, length, hidden_size))
              ).astype(jnp.bfloat16)

    def d_hidden(h):
        return jax.grad(lambda h: weighted_cross_entropy(
            h, weight, targets, token_weights, vocab_major=True, chunk_tokens=12,
            backend=backend)[0])(h)

    want = np.asarray(d_hidden(hidden.astype(jnp.float32)))
    got = np.asarray(d_hidden(hidden), np.float32)
    scale = np.abs(want).max()
    assert 1e-5 < scale < 1e-3  # the gradients really are small
    assert np.abs(got - want).max() / scale < 3e-2


def _rounded_to_bf16(x: jax.Array) -> jax.Array:
    """``x`` rounded to bf16 in value, its gradient passed through unrounded."""
    return x + jax.lax.stop_gradient(x.astype(jnp.bfloat16).astype(jnp.float32) - x)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
def test_bf16_logits_are_the_rounded_fp32_logits(vocab_major):
    # logits_dtype=bf16 stores each fp32-accumulated logit rounded to bf16 and runs the softmax
    # on those in fp32: the same as the dense cross-entropy of the rounded logits, to fp32 ulps
    # (1e-5, as above; fp32 hidden states, so the gradients are not rounded either). Logits of
    # std ~6 (max ~25) as in a trained model: rounding moves the loss by ~1e-2 here, so a path
    # that kept fp32 logits would fail the first check.
    hidden, weight, targets, token_weights = _case(vocab_major)
    weight = 3 * weight

    def ours(h, w, tw):
        return weighted_cross_entropy(h, w, targets, tw, vocab_major=vocab_major,
                                      chunk_tokens=12, logits_dtype=jnp.bfloat16)

    def rounded(h, w, tw):
        head = w.T if vocab_major else w
        logits = jnp.einsum("blh,hv->blv", h, head, precision=jax.lax.Precision.HIGHEST)
        ce = token_cross_entropy(_rounded_to_bf16(logits), targets)
        return jnp.sum(tw * ce), ce

    (total, ce), (want_total, want_ce) = ours(hidden, weight, token_weights), rounded(
        hidden, weight, token_weights)
    exact = _dense(hidden, weight, targets, token_weights, vocab_major)[1]
    assert np.abs(np.asarray(ce - exact)).max() > 1e-3  # the bf16 logits are really rounded
    np.testing.assert_allclose(ce, want_ce, atol=ATOL, rtol=0)
    np.testing.assert_allclose(total, want_total, atol=ATOL, rtol=0)
    got = jax.grad(lambda *a: ours(*a)[0], argnums=(0, 1, 2))(hidden, weight, token_weights)
    want = jax.grad(lambda *a: rounded(*a)[0], argnums=(0, 1, 2))(hidden, weight, token_weights)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, atol=ATOL, rtol=0)


def test_bad_shapes_and_chunk_are_refused():
    hidden, weight, targets, token_weights = _case(True)
    with pytest.raises(ValueError, match=r"expected hidden \[B, L, H\]"):
        weighted_cross_entropy(hidden[0], weight, targets[0], token_weights[0], vocab_major=True)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        weighted_cross_entropy(hidden, weight, targets, token_weights, vocab_major=True,
                               chunk_tokens=0)
    with pytest.raises(ValueError, match="logits_dtype must be float32 or bfloat16"):
        weighted_cross_entropy(hidden, weight, targets, token_weights, vocab_major=True,
                               logits_dtype=jnp.float16)


@pytest.mark.parametrize("logits_dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_path_takes_the_softmax_kernel_on_the_stored_logits(logits_dtype):
    # lowered for CUDA on this CPU machine: each step's softmax terms are the row kernel's, fed the
    # logits as the head matmul stored them (no fp32 copy of bf16 logits in between) and the
    # targets' logits as offsets, writing the exponentials in the compute dtype
    hidden, weight, targets, token_weights = _case(True)
    hidden = hidden.astype(jnp.bfloat16)

    def loss(h, w):
        return weighted_cross_entropy(h, w, targets, token_weights, vocab_major=True,
                                      chunk_tokens=12, logits_dtype=logits_dtype,
                                      backend="gpu")[0]

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(hidden, weight).lower(
        lowering_platforms=("cuda",)).as_text()
    assert 'name = "row_softmax"' in text
    stored = "bf16" if logits_dtype == jnp.bfloat16 else "f32"
    # 3 rows x 4 positions of 53 ids in the stored dtype, padded to a tile
    assert re.search(rf"\(tensor<12x4096x{stored}>, tensor<12xf32>\) -> \(tensor<12x4096xbf16>, "
                     r"tensor<12xf32>, tensor<12xf32>\)", text)
