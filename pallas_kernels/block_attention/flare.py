"""Attention of packed FLARE training rows ``[clean ; noisy]``, split by query stream on Hopper.

Clean queries see only clean keys, causally inside their document; noisy queries see the clean
keys of earlier blocks and their own noisy block (:mod:`.mask`). Plain causal attention is what
cuDNN's flash kernel does, faster than the block kernel on Hopper (docs/performance.md), so there
the clean queries run through cuDNN over the clean keys and the noisy queries through the block
kernel over the whole row; autodiff adds the two calls' gradients of the clean keys. Elsewhere
one block-attention call covers the row (it skips the same invisible tiles).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention import cudnn_causal
from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import TokenLayout

# Documents per row that cuDNN is given room for; a batch with a row holding more runs the
# clean queries through the block kernel instead (a runtime branch, no recompilation).
MAX_CUDNN_DOCUMENTS = 16

CleanAttention = Callable[[jax.Array, jax.Array, jax.Array, TokenLayout], jax.Array]
RaggedCausal = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def flare_attention(q: jax.Array, k: jax.Array, v: jax.Array, clean: TokenLayout,
                    noisy: TokenLayout, *, backend: str = "auto") -> jax.Array:
    """Attention of the row ``[clean ; noisy]``: q ``[B, 2L, Hq, D]``, k, v ``[B, 2L, Hkv, D]``,
    ``clean`` / ``noisy`` the two streams' layouts ``[B, L]`` (positions counting from each
    document's start, as :class:`flare_jax.layout.FlareLayout` builds them).

    ``backend="auto"`` splits by stream where :func:`cudnn_causal.available`; any other backend
    (``"gpu"`` included) runs :func:`~.api.block_attention` once over the row."""
    if backend == "auto" and cudnn_causal.available(q.shape[-1], q.dtype):
        cudnn_clean = functools.partial(clean_causal, ragged=cudnn_causal.causal_attention)
        return split_by_stream(q, k, v, clean, noisy, clean_attention=cudnn_clean, backend="gpu")
    packed = clean.concat(noisy)
    return block_attention(q, k, v, packed, packed, backend=backend)


def split_by_stream(q: jax.Array, k: jax.Array, v: jax.Array, clean: TokenLayout,
                    noisy: TokenLayout, *, clean_attention: CleanAttention,
                    backend: str) -> jax.Array:
    """The row's attention as two calls: ``clean_attention(q, k, v, clean)`` over the clean half,
    the block kernel (``backend``) for the noisy queries over the whole row."""
    length = clean.shape[1]
    head = (slice(None), slice(None, length))
    o_clean = clean_attention(q[head], k[head], v[head], clean)
    o_noisy = block_attention(q[:, length:], k, v, noisy, clean.concat(noisy), backend=backend)
    return jnp.concatenate([o_clean, o_noisy], axis=1)


def clean_causal(q: jax.Array, k: jax.Array, v: jax.Array, clean: TokenLayout, *,
                 ragged: RaggedCausal, max_documents: int = MAX_CUDNN_DOCUMENTS,
                 backend: str = "gpu") -> jax.Array:
    """The clean stream's causal attention through ``ragged(q, k, v, lengths, starts)`` (causal
    inside the documents of :func:`cudnn_causal.document_spans`) when every row holds at most
    ``max_documents`` documents, else through the block kernel (``backend``)."""
    lengths, starts, fits = cudnn_causal.document_spans(clean.segment_ids, max_documents)
    return jax.lax.cond(fits, lambda: ragged(q, k, v, lengths, starts),
                        lambda: block_attention(q, k, v, clean, clean, backend=backend))
