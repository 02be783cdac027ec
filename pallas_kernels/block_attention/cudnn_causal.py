"""Causal attention inside packed documents through cuDNN's fused flash attention (NVIDIA GPUs).

The FLARE clean stream attends causally inside each document, which cuDNN's flash kernel computes
faster than the Pallas kernel on Hopper (docs/performance.md, "Block attention"). Documents reach
cuDNN as ragged segments: per row the start and length of each of at most ``max_segments``
documents (a static bound, the width of those arrays). :func:`document_spans` also says whether
every row fits; callers fall back to the Pallas kernel for batches where one does not.

cuDNN's segments are reached through ``jax._src.cudnn`` (the public
``jax.nn.dot_product_attention`` takes sequence lengths but no segments); :func:`available` says
whether this process can use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.residuals import with_named_residuals

MAX_HEAD_DIM = 256  # cuDNN's flash attention on Hopper
PACKED_COMPUTE_CAPABILITY = (9, 0)  # cuDNN packs segments from Hopper on


def document_spans(segment_ids: jax.Array, max_segments: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's ragged description of the contiguous documents of ``segment_ids [B, T]``.

    Returns ``(lengths [B, M], starts [B, M + 1], fits)`` with ``M = max_segments``: each row's
    document lengths and start offsets in order, entries past its last document -1 (``starts``
    always ends with one); ``fits`` (bool scalar) is whether no row holds more than ``M``
    documents. A document is a run of equal segment ids, so tail padding is one of its own."""
    segment_ids = jnp.asarray(segment_ids)
    length = segment_ids.shape[1]
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments, fill_value=-1)[0])(first)
    starts = starts.astype(jnp.int32)
    following = jnp.concatenate([starts[:, 1:], jnp.full_like(starts[:, :1], -1)], axis=1)
    ends = jnp.where(following >= 0, following, length)
    lengths = jnp.where(starts >= 0, ends - starts, -1)
    fits = jnp.all(first.sum(axis=1) <= max_segments)
    return lengths, jnp.concatenate([starts, jnp.full_like(starts[:, :1], -1)], axis=1), fits


def available(head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether this process's default device runs cuDNN's packed causal attention for ``head_dim``
    and ``dtype`` (bf16 / fp16, CUDA, Hopper or later)."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return False
    try:
        from jax._src.cudnn import fused_attention_stablehlo  # noqa: F401
        capability = jax.devices()[0].compute_capability
    except (ImportError, AttributeError):
        return False
    return tuple(int(x) for x in capability.split(".")) >= PACKED_COMPUTE_CAPABILITY


def _cudnn_attention(q, k, v, lengths, starts, *, scale: float):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts,
                                 kv_offsets=starts, scale=scale,
                                 mask_type=MaskType.PADDING_CAUSAL)


@functools.cache
def _named(scale: float):
    return with_named_residuals(functools.partial(_cudnn_attention, scale=scale))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                     starts: jax.Array, *, scale: float | None = None) -> jax.Array:
    """Causal GQA attention of q ``[B, T, Hq, D]`` over k, v ``[B, T, Hkv, D]`` inside each
    document of :func:`document_spans` (which must fit), through cuDNN; its residuals are named
    like the Pallas kernels' (:mod:`pallas_kernels.residuals`). Returns ``[B, T, Hq, D]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _named(scale)((q, k, v), (lengths, starts))
