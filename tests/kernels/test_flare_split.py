"""FLARE row attention split by query stream (pallas_kernels/block_attention/flare.py): cuDNN's
ragged description of the documents, the split against one block-attention call, the fallback for
rows with too many documents, and the named residuals of a foreign VJP.

cuDNN itself runs on the device only (benchmarks/block_attention.py --split --check); here its
place is taken by :func:`ragged_causal_reference`, which reads nothing but the spans cuDNN gets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from test_block_attention_reference import qkv

from flare_jax.layout import FlareLayout
from pallas_kernels.block_attention import cudnn_causal, flare
from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import TokenLayout, dense_mask
from pallas_kernels.block_attention.reference import block_attention_reference
from pallas_kernels.residuals import KERNEL_RESIDUAL, with_named_residuals

# tolerance: fp32 on both sides, softmax over the same keys summed in another order (two calls
# against one), so a few fp32 ulps of O(1) values.
TOL = dict(rtol=1e-5, atol=1e-5)


def packed_segments(rows: list[list[int]]) -> jnp.ndarray:
    """Segment ids ``[B, L]`` of rows packing documents of the given lengths (ids 1, 2, ...;
    equal lengths per row)."""
    return jnp.asarray([np.repeat(np.arange(1, len(r) + 1), r) for r in rows], jnp.int32)


def ragged_causal_reference(q, k, v, lengths, starts):
    """Causal attention inside the spans ``(starts, lengths)`` only (what cuDNN is asked for):
    token ``i`` sees ``j <= i`` of its own span; a token in no span sees nothing."""
    index = jnp.arange(q.shape[1], dtype=jnp.int32)
    begin, size = starts[:, None, :-1], lengths[:, None, :]
    inside = (begin >= 0) & (index[None, :, None] >= begin) & (index[None, :, None] < begin + size)
    span = jnp.where(inside.any(-1), jnp.argmax(inside, axis=-1), -1 - index[None])  # [B, T]
    layout = TokenLayout.causal(span, jnp.broadcast_to(index, span.shape))
    return block_attention_reference(q, k, v, layout, layout)


def test_document_spans_list_each_document_and_pad_with_minus_one():
    segments = jnp.asarray([[1, 1, 1, 2, 3, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    lengths, starts, fits = cudnn_causal.document_spans(segments, 4)
    np.testing.assert_array_equal(lengths, [[3, 1, 2, 2], [8, -1, -1, -1]])
    np.testing.assert_array_equal(starts, [[0, 3, 4, 6, -1], [0, -1, -1, -1, -1]])
    assert bool(fits)
    assert not bool(cudnn_causal.document_spans(segments, 3)[2])  # row 0 holds 4 documents


@pytest.mark.parametrize("rows", [[[5, 3, 8], [16]], [[1, 1, 13, 1], [2, 14]]])
def test_spans_give_the_clean_streams_visibility(rows):
    """Same span and ``j <= i`` is exactly the clean-over-clean rule of the layout."""
    segments = packed_segments(rows)
    clean = FlareLayout.from_segments(segments, 4).clean
    lengths, starts, _ = cudnn_causal.document_spans(segments, 4)
    index = jnp.arange(segments.shape[1])
    begin = starts[:, :-1]
    inside = ((begin[:, None] >= 0) & (index[None, :, None] >= begin[:, None])
              & (index[None, :, None] < begin[:, None] + lengths[:, None]))
    span = jnp.argmax(inside, axis=-1)
    spans_mask = (span[:, :, None] == span[:, None, :]) & (index[:, None] >= index[None, :])
    assert bool(inside.any(-1).all())
    np.testing.assert_array_equal(spans_mask, dense_mask(clean, clean))


def split_and_one_call(rows: list[list[int]], max_documents: int, backend: str):
    """Outputs and q, k, v gradients of the split (ragged reference for the clean queries) and of
    one block-attention call over the row."""
    segments = packed_segments(rows)
    layout = FlareLayout.from_segments(segments, 4)
    packed = layout.packed()
    q, k, v = qkv(3, 2 * segments.shape[1], 2 * segments.shape[1])
    q, k, v = (jnp.repeat(a, segments.shape[0], axis=0) for a in (q, k, v))
    weight = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape, np.float32))
    clean_attention = functools.partial(flare.clean_causal, ragged=ragged_causal_reference,
                                        max_documents=max_documents, backend=backend)

    def split(q, k, v):
        return flare.split_by_stream(q, k, v, layout.clean, layout.noisy,
                                     clean_attention=clean_attention, backend=backend)

    def one_call(q, k, v):
        return block_attention(q, k, v, packed, packed, backend=backend)

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out * weight), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    return value_and_grads(split), value_and_grads(one_call)


@pytest.mark.parametrize("max_documents", [4, 2], ids=["ragged", "falls_back"])
@pytest.mark.parametrize("backend", ["reference", "gpu_interpret"])
def test_split_by_stream_equals_one_call(max_documents, backend):
    """Row 0 packs three documents, so room for 2 takes the block-kernel branch."""
    (out, grads), (want, want_grads) = split_and_one_call([[5, 3, 8], [16]], max_documents,
                                                          backend)
    np.testing.assert_allclose(out, want, **TOL)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, **TOL, err_msg=f"d{name}")


def test_flare_attention_is_one_block_call_without_cudnn():
    """On CPU cuDNN is not available; the row runs as one block-attention call."""
    assert not cudnn_causal.available(16, jnp.bfloat16)
    layout = FlareLayout.from_segments(packed_segments([[5, 3, 8]]), 4)
    q, k, v = qkv(5, 32, 32)
    packed = layout.packed()
    got = flare.flare_attention(q, k, v, layout.clean, layout.noisy)
    np.testing.assert_array_equal(got, block_attention(q, k, v, packed, packed))


def test_named_residuals_of_a_foreign_vjp_are_kept_by_the_policy(capsys):
    """Wrapped, the residuals of the function's own VJP (here ``cosh(a * b)``) are saved under a
    policy that keeps KERNEL_RESIDUAL, where the plain function saves nothing of its own (its
    forward runs again in the backward pass); gradients are the function's, and the integer
    metadata gets none."""
    def fn(a, b, index):
        return jnp.sinh(a * b)[index]

    wrapped = with_named_residuals(fn)
    a, b, index = jnp.arange(4.0), jnp.full(4, 2.0), jnp.asarray([0, 2])
    policy = jax.checkpoint_policies.save_only_these_names(KERNEL_RESIDUAL)

    def loss(call):
        return jax.checkpoint(lambda a, b: jnp.sum(call(a, b) * jnp.asarray([1.0, -2.0])),
                              policy=policy)

    kept = loss(lambda a, b: wrapped((a, b), (index,)))
    plain = loss(lambda a, b: fn(a, b, index))
    np.testing.assert_allclose(jax.grad(kept, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b))
    saved = {}
    for name, f in (("kept", kept), ("plain", plain)):
        print_saved_residuals(f, a, b)
        saved[name] = capsys.readouterr().out
    assert "f32[4] named 'kernel_residual'" in saved["kept"]
    assert "named" not in saved["plain"]
