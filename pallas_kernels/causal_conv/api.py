"""Public causal conv + SiLU: padding, backend dispatch and the GPU kernel's custom VJP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import resolve_backend
from pallas_kernels.causal_conv import gpu, reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _with_gpu_backward(padded_x, padded_clean, weight, padded_seg, block_size, interpret):
    return reference.conv_silu(padded_x, padded_clean, weight, padded_seg, block_size)


def _fwd(padded_x, padded_clean, weight, padded_seg, block_size, interpret):
    # The residuals are not named (``pallas_kernels.residuals``): they are the padded inputs, a
    # cheap copy of what the caller keeps (the projection's output) that a remat policy should
    # rebuild rather than store a second time.
    out = reference.conv_silu(padded_x, padded_clean, weight, padded_seg, block_size)
    return out, (padded_x, padded_clean, weight, padded_seg)


def _bwd(block_size, interpret, residuals, d_out):
    padded_x, padded_clean, weight, padded_seg = residuals
    grads = gpu.conv_silu_bwd(padded_x, padded_clean, weight, padded_seg, block_size, d_out,
                              interpret=interpret)
    return (grads.d_x, grads.d_clean, grads.d_weight.astype(weight.dtype),
            np.zeros(padded_seg.shape, jax.dtypes.float0))


_with_gpu_backward.defvjp(_fwd, _bwd)


def pad_inputs(x: jax.Array, segment_ids: jax.Array, kernel: int, *,
               context: jax.Array | None = None, clean: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(padded_x, padded_clean, padded_seg)``: ``K - 1`` positions before ``x`` (the context, or
    zeros; zeros before ``clean``; the first token's segment id), as the kernels take them."""
    pad = kernel - 1
    batch, _, channels = x.shape
    if context is None:
        context = jnp.zeros((batch, pad, channels), x.dtype)
    padded_x = jnp.concatenate([context.astype(x.dtype), x], axis=1)
    padded_seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids], axis=1)
    padded_clean = None
    if clean is not None:
        padded_clean = jnp.concatenate([jnp.zeros_like(context, x.dtype), clean.astype(x.dtype)],
                                       axis=1)
    return padded_x, padded_clean, padded_seg


def causal_conv_silu(x: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                     context: jax.Array | None = None, clean: jax.Array | None = None,
                     block_size: int | None = None, backend: str = "auto") -> jax.Array:
    """``silu(sum_k weight[K-1-k] * x[t-k])`` over taps of ``t``'s document, fp32, in ``x``'s dtype.

    Args:
      x: ``[B, T, C]`` conv inputs; ``weight``: ``[K, C]`` (``weight[K-1]`` multiplies ``x[t]``).
      segment_ids: ``[B, T]``; a tap in another document contributes nothing.
      context: ``[B, K-1, C]`` inputs preceding ``x[:, 0]`` (a decoding cache), taken to belong to
        ``x[:, 0]``'s document and already zeroed where they do not; zeros when None.
      clean, block_size: FLARE handoff. ``x`` is then the noisy stream of a row that starts on a
        block boundary, and taps that reach before the start of ``t``'s block read ``clean``.
      backend: the forward is XLA's everywhere (one elementwise fusion); ``gpu`` takes the
        backward from a Pallas kernel (``gpu_interpret``: in interpret mode), every other backend
        from autodiff of the jnp forward.
    """
    if clean is None:
        block_size = None
    elif not block_size or block_size < 1:
        raise ValueError(f"causal_conv_silu: a clean stream (FLARE handoff) needs a positive "
                         f"block_size, got {block_size!r}")
    padded_x, padded_clean, padded_seg = pad_inputs(x, segment_ids, weight.shape[0],
                                                    context=context, clean=clean)
    backend = resolve_backend(backend)
    if backend in ("gpu", "gpu_interpret"):
        return _with_gpu_backward(padded_x, padded_clean, weight, padded_seg, block_size,
                                  backend == "gpu_interpret")
    return reference.conv_silu(padded_x, padded_clean, weight, padded_seg, block_size)
