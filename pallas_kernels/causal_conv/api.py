"""Public causal conv + SiLU: padding, backend dispatch and the GPU kernels' custom VJP."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import resolve_backend
from pallas_kernels.causal_conv import gpu, reference


class _Static(NamedTuple):
    """The GPU path's static arguments."""

    block_size: int | None
    head_dim: int | None  # of the l2-normalised heads (None: none)
    split_at: tuple[int, ...]
    interpret: bool

    def norm(self, end) -> reference.HeadNorm | None:
        return None if self.head_dim is None else reference.HeadNorm(self.head_dim, end)


def _gpu_forward(x, context, clean, weight, segment_ids, norm_end, static):
    return tuple(gpu.conv_silu_fwd(x, context, clean, weight, segment_ids, static.block_size,
                                   static.norm(norm_end), static.split_at,
                                   interpret=static.interpret))


_gpu_conv = jax.custom_vjp(_gpu_forward, nondiff_argnums=(6,))


def _fwd(x, context, clean, weight, segment_ids, norm_end, static):
    # The residuals are the caller's arrays (the projection's output, which a remat policy
    # keeps).
    out = _gpu_forward(x, context, clean, weight, segment_ids, norm_end, static)
    return out, (x, context, clean, weight, segment_ids, norm_end)


def _bwd(static, residuals, d_out):
    x, context, clean, weight, segment_ids, norm_end = residuals
    grads = gpu.conv_silu_bwd(x, context, clean, weight, segment_ids, static.block_size,
                              list(d_out), static.norm(norm_end), static.split_at,
                              interpret=static.interpret)
    d_context = None if context is None else grads.d_context.astype(context.dtype)
    d_end = None if norm_end is None else np.zeros(np.shape(norm_end), jax.dtypes.float0)
    return (grads.d_x, d_context, grads.d_clean, grads.d_weight.astype(weight.dtype),
            np.zeros(segment_ids.shape, jax.dtypes.float0), d_end)


_gpu_conv.defvjp(_fwd, _bwd)


def _gpu_pair_forward(row, weight, segment_ids, norm_end, static):
    return tuple(tuple(parts) for parts in gpu.conv_silu_fwd_pair(
        row, weight, segment_ids, static.block_size, static.norm(norm_end), static.split_at,
        interpret=static.interpret))


_gpu_conv_pair = jax.custom_vjp(_gpu_pair_forward, nondiff_argnums=(4,))


def _pair_fwd(row, weight, segment_ids, norm_end, static):
    out = _gpu_pair_forward(row, weight, segment_ids, norm_end, static)
    return out, (row, weight, segment_ids, norm_end)


def _pair_bwd(static, residuals, d_out):
    row, weight, segment_ids, norm_end = residuals
    d_row, d_weight = gpu.conv_silu_bwd_pair(
        row, weight, segment_ids, static.block_size, list(d_out[0]), list(d_out[1]),
        static.norm(norm_end), static.split_at, interpret=static.interpret)
    d_end = None if norm_end is None else np.zeros(np.shape(norm_end), jax.dtypes.float0)
    return (d_row, d_weight.astype(weight.dtype), np.zeros(segment_ids.shape, jax.dtypes.float0),
            d_end)


_gpu_conv_pair.defvjp(_pair_fwd, _pair_bwd)


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
    padded_seg = reference.padded_segments(segment_ids, pad)
    padded_clean = None
    if clean is not None:
        padded_clean = jnp.concatenate([jnp.zeros_like(context, x.dtype), clean.astype(x.dtype)],
                                       axis=1)
    return padded_x, padded_clean, padded_seg


def causal_conv_silu(x: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                     context: jax.Array | None = None, clean: jax.Array | None = None,
                     block_size: int | None = None, norm: reference.HeadNorm | None = None,
                     split_at: tuple[int, ...] | None = None, backend: str = "auto"
                     ) -> jax.Array | tuple[jax.Array, ...]:
    """``silu(sum_k weight[K-1-k] * x[t-k])`` over taps of ``t``'s document, fp32, in ``x``'s dtype.

    Args:
      x: ``[B, T, C]`` conv inputs; ``weight``: ``[K, C]`` (``weight[K-1]`` multiplies ``x[t]``).
      segment_ids: ``[B, T]``; a tap in another document contributes nothing.
      context: ``[B, K-1, C]`` inputs preceding ``x[:, 0]`` (a decoding cache), taken to belong to
        ``x[:, 0]``'s document and already zeroed where they do not; zeros when None.
      clean, block_size: FLARE handoff. ``x`` is then the noisy stream of a row that starts on a
        block boundary, and taps that reach before the start of ``t``'s block read ``clean``.
      norm: l2-normalise (fp32, before the cast) the output's heads of ``norm.head_dim``
        channels that start below channel ``norm.end`` (the Gated DeltaNet's q and k).
      split_at: return the output as the parts of its channels that start at these channels
        (``jnp.split``'s indices; the GPU kernels write each part as its own array).
      backend: ``gpu`` runs the forward and the backward as Pallas kernels (``gpu_interpret``:
        in interpret mode); every other backend runs the jnp forward (one XLA fusion) and its
        autodiff.
    """
    if clean is None:
        block_size = None
    else:
        _check_block_size(block_size)
    backend = resolve_backend(backend)
    if backend in ("gpu", "gpu_interpret"):
        end = None if norm is None else jnp.asarray(norm.end, jnp.int32)
        parts = _gpu_conv(x, context, clean, weight, segment_ids, end,
                          _gpu_static(block_size, norm, split_at, backend))
        return parts if split_at is not None else parts[0]
    padded_x, padded_clean, padded_seg = pad_inputs(x, segment_ids, weight.shape[0],
                                                    context=context, clean=clean)
    out = reference.conv_silu(padded_x, padded_clean, weight, padded_seg, block_size, norm)
    return out if split_at is None else tuple(jnp.split(out, split_at, axis=-1))


def causal_conv_silu_pair(row: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                          block_size: int, norm: reference.HeadNorm | None = None,
                          split_at: tuple[int, ...] | None = None, backend: str = "auto"
                          ) -> tuple[jax.Array | tuple[jax.Array, ...], ...]:
    """Both FLARE streams' convs over ``row [B, 2T, C]``, the clean stream then the noisy one
    (``segment_ids [B, T]`` of each): ``(causal_conv_silu(clean, ...), causal_conv_silu(noisy,
    ..., clean=clean, block_size=block_size))`` (arguments as :func:`causal_conv_silu` takes
    them; no context rows). On the GPU backends one custom VJP whose kernels read both halves of
    the row in place and write its gradient as one array: the clean half's gradient from both
    streams is summed inside its input-gradient kernel, not formed twice and added."""
    _check_block_size(block_size)
    if row.ndim != 3 or row.shape[1] != 2 * segment_ids.shape[1]:
        raise ValueError(f"causal_conv_silu_pair: row must be [B, 2T, C] for segment_ids "
                         f"{segment_ids.shape} ([B, T]), got {row.shape}")
    backend = resolve_backend(backend)
    if backend not in ("gpu", "gpu_interpret"):
        clean, noisy = jnp.split(row, 2, axis=1)
        kw = dict(norm=norm, split_at=split_at, backend=backend)
        return (causal_conv_silu(clean, weight, segment_ids, **kw),
                causal_conv_silu(noisy, weight, segment_ids, clean=clean, block_size=block_size,
                                 **kw))
    end = None if norm is None else jnp.asarray(norm.end, jnp.int32)
    outs = _gpu_conv_pair(row, weight, segment_ids, end,
                          _gpu_static(block_size, norm, split_at, backend))
    return outs if split_at is not None else (outs[0][0], outs[1][0])


def _check_block_size(block_size: int | None) -> None:
    if not block_size or block_size < 1:
        raise ValueError(f"causal_conv_silu: a clean stream (FLARE handoff) needs a positive "
                         f"block_size, got {block_size!r}")


def _gpu_static(block_size: int | None, norm: reference.HeadNorm | None,
                split_at: tuple[int, ...] | None, backend: str) -> _Static:
    return _Static(block_size, None if norm is None else norm.head_dim, tuple(split_at or ()),
                   backend == "gpu_interpret")
