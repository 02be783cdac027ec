"""Oracle tests: the jnp reference against hand-written attention, layouts and leakage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout

BLOCK = 4


def flare_row(doc_lengths: list[int], block_size: int = BLOCK) -> TokenLayout:
    """Packed ``[clean ; noisy]`` layout of one row; blocks on the absolute grid of the row."""
    seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(doc_lengths)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in doc_lengths])
    blk = np.arange(seg.size, dtype=np.int32) // block_size
    clean = TokenLayout(*(jnp.asarray(a)[None] for a in (seg, pos, blk, 0 * seg)))
    noisy = TokenLayout(*(jnp.asarray(a)[None] for a in (seg, pos, blk, 0 * seg + 1)))
    return clean.concat(noisy)


def rule_mask(q: TokenLayout, kv: TokenLayout) -> np.ndarray:
    """The DESIGN visibility rules, written out per pair of tokens (independent of mask.py)."""
    qs, qp, qb, qn = (np.asarray(a)[0] for a in (q.segment_ids, q.positions, q.block_ids, q.noisy))
    ks, kp, kb, kn = (np.asarray(a)[0] for a in (kv.segment_ids, kv.positions, kv.block_ids, kv.noisy))
    out = np.zeros((qs.size, ks.size), bool)
    for i in range(qs.size):
        for j in range(ks.size):
            if qs[i] != ks[j]:
                continue
            if not qn[i]:
                out[i, j] = not kn[j] and kp[j] <= qp[i]
            else:
                out[i, j] = kb[j] < qb[i] if not kn[j] else kb[j] == qb[i]
    return out


def naive_attention(q, k, v, mask: np.ndarray, scale: float) -> np.ndarray:
    """float64 softmax attention of one batch row with an explicit [Tq, Tk] mask, GQA by repeat."""
    q, k, v = (np.asarray(a, np.float64)[0] for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    out = np.zeros_like(q)
    for h in range(q.shape[1]):
        for i in range(q.shape[0]):
            idx = np.flatnonzero(mask[i])
            if idx.size == 0:
                continue
            s = k[idx, h] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[idx, h]
    return out[None]


def qkv(seed: int, tq: int, tk: int, hq: int = 4, hkv: int = 2, d: int = 16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((1, tq, hq, d), (1, tk, hkv, d), (1, tk, hkv, d))
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def decode_case(tq: int = 3, tk: int = 12, filled: int = 7, noisy_queries: bool = False):
    """Queries at positions filled.. of document 0 against a cache with ``filled`` slots in use."""
    kseg = np.where(np.arange(tk) < filled, 0, EMPTY_SEGMENT).astype(np.int32)
    kpos = np.arange(tk, dtype=np.int32)
    kv_layout = TokenLayout(*(jnp.asarray(a)[None] for a in (kseg, kpos, kpos // BLOCK, 0 * kpos)))
    qpos = filled + np.arange(tq, dtype=np.int32)
    qnoisy = np.full(tq, int(noisy_queries), np.int32)
    q_layout = TokenLayout(*(jnp.asarray(a)[None] for a in (0 * qpos, qpos, qpos // BLOCK, qnoisy)))
    return q_layout, kv_layout


# tolerance: fp32 compute vs float64 numpy over <= 24 keys, errors are a few fp32 ulps.
TOL = dict(rtol=2e-5, atol=2e-6)


def test_causal_matches_naive_softmax():
    t, scale = 10, 0.3
    q, k, v = qkv(0, t, t)
    layout = TokenLayout.causal(jnp.zeros((1, t), jnp.int32), jnp.arange(t)[None])
    out = block_attention(q, k, v, layout, layout, scale=scale, backend="reference")
    np.testing.assert_allclose(out, naive_attention(q, k, v, np.tril(np.ones((t, t), bool)), scale), **TOL)


@pytest.mark.parametrize("docs", [[7, 5], [3, 9, 2]])
def test_flare_row_matches_rules(docs):
    layout = flare_row(docs)
    t = layout.shape[1]
    q, k, v = qkv(1, t, t)
    out = block_attention(q, k, v, layout, layout, backend="reference")
    expect = naive_attention(q, k, v, rule_mask(layout, layout), q.shape[-1] ** -0.5)
    np.testing.assert_allclose(out, expect, **TOL)


@pytest.mark.parametrize("noisy", [False, True])
def test_decode_and_denoise_match_rules(noisy):
    q_layout, kv_layout = decode_case(noisy_queries=noisy)
    q, k, v = qkv(2, q_layout.shape[1], kv_layout.shape[1])
    out = block_attention(q, k, v, q_layout, kv_layout, backend="reference")
    expect = naive_attention(q, k, v, rule_mask(q_layout, kv_layout), q.shape[-1] ** -0.5)
    np.testing.assert_allclose(out, expect, **TOL)


def test_query_without_visible_key_is_zero_with_finite_grads():
    q_layout, kv_layout = decode_case()
    q_layout = TokenLayout(
        q_layout.segment_ids.at[0, 1].set(5), q_layout.positions, q_layout.block_ids, q_layout.noisy
    )
    q, k, v = qkv(3, q_layout.shape[1], kv_layout.shape[1])

    def loss(q, k, v):
        return jnp.sum(block_attention(q, k, v, q_layout, kv_layout, backend="reference") ** 2)

    out = block_attention(q, k, v, q_layout, kv_layout, backend="reference")
    assert np.all(np.asarray(out[0, 1]) == 0.0)
    assert np.any(np.asarray(out[0, 0]) != 0.0)
    for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
        assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_inputs_return_bf16():
    layout = flare_row([6, 6])
    q, k, v = qkv(4, 24, 24, dtype=jnp.bfloat16)
    out = block_attention(q, k, v, layout, layout, backend="reference")
    assert out.dtype == jnp.bfloat16
    ref = block_attention(*(a.astype(jnp.float32) for a in (q, k, v)), layout, layout, backend="reference")
    # tolerance: only the final rounding to bf16 differs (8 mantissa bits).
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


def assert_no_leakage(backend: str, q_layout: TokenLayout, kv_layout: TokenLayout, queries):
    """Perturbing every key/value a query cannot see leaves that query's output bit-identical."""
    q, k, v = qkv(5, q_layout.shape[1], kv_layout.shape[1])
    base = np.asarray(block_attention(q, k, v, q_layout, kv_layout, backend=backend))
    hidden_all = ~rule_mask(q_layout, kv_layout)
    for i in queries:
        hidden = jnp.asarray(hidden_all[i])[None, :, None, None]
        k2 = jnp.where(hidden, k * 3.0 + 7.0, k)
        v2 = jnp.where(hidden, -v * 5.0 - 11.0, v)
        out = np.asarray(block_attention(q, k2, v2, q_layout, kv_layout, backend=backend))
        np.testing.assert_array_equal(out[0, i], base[0, i])
        assert not np.array_equal(out, base)


def test_reference_has_no_leakage():
    layout = flare_row([7, 5])
    # clean query, noisy query in a partial block, noisy query of the second document
    assert_no_leakage("reference", layout, layout, [5, 12 + 6, 12 + 9])


def test_unknown_backend_rejected():
    layout = flare_row([4])
    q, k, v = qkv(6, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        block_attention(q, k, v, layout, layout, backend="cuda")
