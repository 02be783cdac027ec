"""Reference gated delta rule: HF parity, recurrent == chunked, resets, gradients, handoff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from pallas_kernels.gated_delta import api, reference

# fp32 everywhere; the two forms reassociate sums over <= 64 tokens of O(1) terms, so 1e-5
# relative (a few hundred fp32 ulps) is tight but safe.
TOL = dict(rtol=1e-5, atol=1e-5)

recurrent = jax.jit(reference.recurrent_gated_delta_rule, static_argnames="scale")
chunked = jax.jit(reference.chunk_gated_delta_rule, static_argnames=("scale", "chunk_size"))


def make_inputs(seed, b=2, t=45, hk=2, hv=4, dk=16, dv=8, dtype=jnp.float32):
    """Random inputs obeying the contract: l2-normalised q/k, g <= 0, beta in (0, 1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, hk, dk))
    k = jax.random.normal(ks[1], (b, t, hk, dk))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, hv, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, hv)))
    s0 = jax.random.normal(ks[5], (b, hv, dk, dv))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)), s0


def packed_segments(b, t, seed, max_docs=5):
    """Segment ids with several documents per row (contiguous runs, row 0 left-padded)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=max_docs - 1, replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(t), side="right")
    return jnp.asarray(seg)


def packed_case():
    """T = 45 (not a chunk multiple), GQA, five documents per row, initial state. The tests
    below share its jitted recurrent oracle (one compile)."""
    (q, k, v, g, beta), s0 = make_inputs(2, t=45)
    return (q, k, v, g, beta), dict(initial_state=s0, segment_ids=packed_segments(2, 45, 3))


def test_recurrent_matches_hf_torch():
    (q, k, v, g, beta), kw = packed_case()
    s0 = kw["initial_state"]
    o, s = recurrent(q, k, v, g, beta, initial_state=s0, segment_ids=jnp.zeros_like(kw["segment_ids"]))
    t = [torch.from_numpy(np.array(x)) for x in (q, k, v, g, beta, s0)]
    o_hf, s_hf = hf.torch_recurrent_gated_delta_rule(
        *t[:5], initial_state=t[5], output_final_state=True, use_qk_l2norm_in_kernel=False
    )
    np.testing.assert_allclose(o, o_hf.numpy(), **TOL)
    np.testing.assert_allclose(s, s_hf.numpy(), **TOL)


def test_unit_lower_inverse():
    n = 37  # odd: uneven halves; 18 -> 9 + 9 exercises the batched even split too
    a = jnp.tril(jax.random.uniform(jax.random.PRNGKey(n), (2, n, n), minval=-0.3, maxval=0.3), -1)
    x = jax.jit(reference.unit_lower_inverse)(a)
    expected = np.linalg.inv(np.eye(n) + np.asarray(a, np.float64))
    # fp32 forward substitution and block merges vs a float64 inverse of a well-conditioned
    # unit-triangular matrix: entries O(1), errors a few fp32 ulps times the merge depth.
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_segment_reset_equals_separate_documents():
    (q, k, v, g, beta), kw = packed_case()
    o, s = recurrent(q, k, v, g, beta, **kw)
    # Every document runs alone, zero-padded at the end to T (g = beta = 0 padding leaves the
    # state unchanged), all as one batch; only each row's first document sees its s0.
    seg = np.asarray(kw["segment_ids"])
    docs = [(r, lo, hi) for r in range(seg.shape[0]) for lo, hi in _runs(seg[r])]
    t = seg.shape[1]

    def split(x):
        return jnp.stack(
            [jnp.pad(x[r, lo:hi], [(0, t - hi + lo)] + [(0, 0)] * (x.ndim - 2)) for r, lo, hi in docs]
        )

    s0 = kw["initial_state"]
    init = jnp.stack([s0[r] if lo == 0 else jnp.zeros_like(s0[r]) for r, lo, _ in docs])
    o_d, s_d = recurrent(*map(split, (q, k, v, g, beta)), initial_state=init)
    for i, (r, lo, hi) in enumerate(docs):
        np.testing.assert_allclose(o[r, lo:hi], o_d[i, : hi - lo], **TOL)
        if hi == t:
            np.testing.assert_allclose(s[r], s_d[i], **TOL)


def _runs(seg_row: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each run of equal ids."""
    cuts = [0, *(np.flatnonzero(np.diff(seg_row)) + 1), len(seg_row)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def test_chunked_matches_recurrent():
    x, kw = packed_case()
    o_r, s_r = recurrent(*x, **kw)
    o_c, s_c = chunked(*x, chunk_size=16, **kw)
    np.testing.assert_allclose(o_c, o_r, **TOL)
    np.testing.assert_allclose(s_c, s_r, **TOL)


@functools.cache
def gradient_case(backend: str):
    """Outputs and gradients wrt (q, k, v, g, beta, h0) of a fixed packed case (T = 21, three
    documents, GQA, chunk 8) for ``backend`` or "recurrent"; cached: tests share compiles."""
    (q, k, v, g, beta), s0 = make_inputs(4, b=1, t=21, hk=1, hv=2)
    seg = jnp.asarray([[0] * 5 + [1] * 12 + [2] * 4], jnp.int32)
    w_o = jax.random.normal(jax.random.PRNGKey(9), v.shape)

    def loss(q, k, v, g, beta, s0):
        kw = dict(initial_state=s0, segment_ids=seg)
        if backend == "recurrent":
            o, s = reference.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
        else:
            o, s = api.gated_delta_rule(q, k, v, g, beta, chunk_size=8, backend=backend, **kw)
        return jnp.sum(o * w_o) + jnp.sum(s * s), (o, s)

    grad = jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))
    (_, outs), grads = grad(q, k, v, g, beta, s0)
    return outs, grads


def assert_gradient_cases_match(backend: str, oracle: str) -> None:
    """Outputs to TOL; gradients pass through the triangular inverse: 1e-4 on O(1) values."""
    (outs, grads), (outs_r, grads_r) = gradient_case(backend), gradient_case(oracle)
    for a, b in zip(outs, outs_r, strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], grads, grads_r, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_chunked_gradients_match_recurrent():
    assert_gradient_cases_match("reference", "recurrent")


def test_api_chunked_prefill_then_decode_step():
    x, kw = packed_case()
    o_r, s_r = recurrent(*x, **kw)
    seg = kw["segment_ids"]
    rule = jax.jit(api.gated_delta_rule, static_argnames="backend")
    _, s_pre = rule(
        *(a[:, :44] for a in x),
        initial_state=kw["initial_state"],
        segment_ids=seg[:, :44],
        backend="reference",
    )
    # Decode (T == 1) continues from the prefill state; the token keeps document 4's id.
    o1, s1 = rule(*(a[:, 44:] for a in x), initial_state=s_pre, segment_ids=seg[:, 44:])
    np.testing.assert_allclose(o1, o_r[:, 44:], **TOL)
    np.testing.assert_allclose(s1, s_r, **TOL)
    bf16 = [a.astype(jnp.bfloat16) for a in x]
    ob, sb = jax.eval_shape(functools.partial(api.gated_delta_rule, backend="reference"), *bf16)
    assert ob.dtype == jnp.bfloat16 and sb.dtype == jnp.float32


def test_handoff_equals_clean_prefix_then_noisy_block():
    b, t, bs = 2, 29, 8
    (q, k, v, g, beta), s0 = make_inputs(6, b=b, t=t)
    noisy, _ = make_inputs(7, b=b, t=t)
    clean = api.GatedDeltaInputs(q, k, v, g, beta)
    noisy = api.GatedDeltaInputs(*noisy)
    seg = packed_segments(b, t, seed=8, max_docs=4)
    seg = seg.at[1, 16:].set(7)  # a document starting exactly at a block boundary
    handoff = jax.jit(
        functools.partial(
            api.gated_delta_rule_handoff, block_size=bs, chunk_size=16, scale=0.3, backend="reference"
        )
    )
    o_c, o_n, s = handoff(clean, noisy, segment_ids=seg, initial_state=s0)
    # One batched oracle call: row (blk, r) is [clean < lo ; noisy lo..hi ; clean >= hi], whose
    # outputs on [lo, hi) are causal in the prefix only; the last nb-th group is all clean.
    nb = -(-t // bs)
    pos = jnp.arange(t)
    blocks = jnp.arange(nb + 1)[:, None]
    take_noisy = (pos[None] >= bs * blocks) & (pos[None] < bs * (blocks + 1)) & (blocks < nb)
    mixed = [
        jnp.where(take_noisy.reshape(nb + 1, 1, t, *[1] * (c.ndim - 2)), n[None], c[None]).reshape(
            (nb + 1) * b, *c.shape[1:]
        )
        for c, n in zip(clean, noisy, strict=True)
    ]
    o_m, s_m = recurrent(
        *mixed,
        scale=0.3,
        initial_state=jnp.tile(s0, (nb + 1, 1, 1, 1)),
        segment_ids=jnp.tile(seg, (nb + 1, 1)),
    )
    o_m = o_m.reshape(nb + 1, b, *o_m.shape[1:])
    np.testing.assert_allclose(o_c, o_m[nb], **TOL)
    np.testing.assert_allclose(s, s_m[nb * b :], **TOL)
    for blk in range(nb):
        lo, hi = blk * bs, min(t, (blk + 1) * bs)
        np.testing.assert_allclose(o_n[:, lo:hi], o_m[blk, :, lo:hi], **TOL, err_msg=f"block {blk}")
