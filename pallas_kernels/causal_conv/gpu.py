"""Pallas GPU (Triton lowering) backward of the causal depthwise conv + SiLU.

One program per (row, tile of ``BLOCK_T`` padded positions ``q``, tile of ``BLOCK_C`` channels).
Input ``q`` is read by output ``t = q - (K-1) + j`` through its tap ``j``, so the program
recomputes the pre-activation of those outputs from the inputs (``K`` taps each, from L1/L2), turns
the output cotangent into ``d_pre = dy * silu'(pre)`` and sums ``d_pre * weight[K-1-j]`` over the
taps that read ``q``: the gradient of the input, or of the clean stream where a handoff tap read it.
The weight gradient of the outputs ``t = q`` is summed over the tile's positions into one partial
sum per tile; the caller adds the tiles. Nothing but the inputs and ``dy`` is read from HBM.
Autodiff of the jnp conv instead became one XLA reduction fusion with ten ``[T, C]`` outputs
around the weight-gradient column sum: 1.3 ms per layer at ``[4096, 6144]`` in the H200 train
step, against about 0.3 ms per call (two per layer) for this kernel (docs/performance.md, "Train
step").

The wrapper pads every array along time (zeros, segment id -1) so that every shifted load is in
bounds (interpret mode clamps out-of-bounds slices instead of masking them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_tiles import dividing_tile

BLOCK_T = 16
BLOCK_C = 128
NO_SEGMENT = -1


class ConvGrads(NamedTuple):
    """``d_x``, ``d_clean`` (None without handoff) over the padded positions ``[B, T + K - 1, C]``
    and ``d_weight [K, C]`` (fp32)."""

    d_x: jax.Array
    d_clean: jax.Array | None
    d_weight: jax.Array


def _bwd_kernel(x_ref, clean_ref, seg_ref, w_ref, dy_ref, dx_ref, dclean_ref, dw_ref, *,
                kernel: int, block_c: int, block_size: int | None):
    b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pad = kernel - 1
    q0 = pl.multiple_of(i * BLOCK_T, BLOCK_T)
    cs = pl.ds(pl.multiple_of(c * block_c, block_c), block_c)
    weight = [w_ref[j, cs].astype(jnp.float32)[None, :] for j in range(kernel)]

    def rows(ref, shift):
        """``ref``'s tile starting ``shift`` positions after the padded position ``q0 - pad``."""
        return ref[b, pl.ds(q0 + shift, BLOCK_T), cs]

    def segs(shift):
        return seg_ref[b, pl.ds(q0 + shift, BLOCK_T)]

    seg_q = segs(pad)  # the segment of input q (array index q + pad)
    d_x = jnp.zeros((BLOCK_T, block_c), jnp.float32)
    d_clean = jnp.zeros_like(d_x)
    for k in range(kernel):  # outputs t = q - pad + k read q through their tap k
        seg_t = segs(pad + k)
        offset = (q0 - pad + k + jnp.arange(BLOCK_T)) % block_size if block_size else None
        pre = jnp.zeros_like(d_x)
        taps = []
        for j in range(kernel):
            tap = rows(x_ref, pad + k - j)
            if clean_ref is not None and j > 0:
                tap = jnp.where((offset < j)[:, None], rows(clean_ref, pad + k - j), tap)
            tap = jnp.where((segs(pad + k - j) == seg_t)[:, None], tap.astype(jnp.float32), 0.0)
            pre = pre + tap * weight[pad - j]
            taps.append(tap)
        sig = jax.nn.sigmoid(pre)
        d_pre = rows(dy_ref, pad + k).astype(jnp.float32) * sig * (1.0 + pre * (1.0 - sig))
        if k == pad:  # outputs t = q: each output of the row is in exactly one program's tile
            for j in range(kernel):
                dw_ref[pad - j, :] = jnp.sum(d_pre * taps[j], axis=0)
        grad = jnp.where((seg_q == seg_t)[:, None], d_pre * weight[pad - k], 0.0)
        if clean_ref is not None and k > 0:
            crosses = (offset < k)[:, None]
            d_clean = d_clean + jnp.where(crosses, grad, 0.0)
            grad = jnp.where(crosses, 0.0, grad)
        d_x = d_x + grad
    dx_ref[...] = d_x.astype(dx_ref.dtype)
    if dclean_ref is not None:
        dclean_ref[...] = d_clean.astype(dclean_ref.dtype)


def conv_silu_bwd(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
                  padded_seg: jax.Array, block_size: int | None, d_out: jax.Array, *,
                  interpret: bool = False) -> ConvGrads:
    """Gradients of :func:`reference.conv_silu` for the output cotangent ``d_out [B, T, C]``."""
    kernel = weight.shape[0]
    if kernel & (kernel - 1) and not interpret:
        raise ValueError(f"the GPU conv kernel needs a power-of-two conv kernel size "
                         f"(linear_conv_kernel_dim), got {kernel}")
    pad = kernel - 1
    batch, padded_len, channels = padded_x.shape
    block_c = dividing_tile(channels, BLOCK_C, interpret=interpret,
                            what="the GPU conv kernel's channel count")
    tiles = pl.cdiv(padded_len, BLOCK_T)
    total = tiles * BLOCK_T + 2 * pad  # every shifted load in bounds

    def extend(a: jax.Array, before: int, fill=0) -> jax.Array:
        widths = [(0, 0), (before, total - before - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return jnp.pad(a, widths, constant_values=fill)

    handoff = padded_clean is not None
    inputs = [extend(padded_x, pad), extend(padded_clean, pad) if handoff else None,
              extend(padded_seg.astype(jnp.int32), pad, NO_SEGMENT), weight,
              extend(d_out, 2 * pad)]  # output t sits at padded position t + K - 1
    tile = pl.BlockSpec((None, BLOCK_T, block_c), lambda b, i, c: (b, i, c))
    stream = jax.ShapeDtypeStruct((batch, tiles * BLOCK_T, channels), padded_x.dtype)
    out_shape = [stream, stream if handoff else None,
                 jax.ShapeDtypeStruct((batch, tiles, kernel, channels), jnp.float32)]
    out_specs = [tile, tile if handoff else None,
                 pl.BlockSpec((None, None, kernel, block_c), lambda b, i, c: (b, i, 0, c))]
    d_x, d_clean, d_weight = pl.pallas_call(
        functools.partial(_bwd_kernel, kernel=kernel, block_c=block_c,
                          block_size=block_size if handoff else None),
        grid=(batch, tiles, channels // block_c),
        in_specs=[None if a is None else pl.no_block_spec for a in inputs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="causal_conv_bwd",
    )(*inputs)
    crop = slice(0, padded_len)
    return ConvGrads(d_x[:, crop], None if d_clean is None else d_clean[:, crop],
                     jnp.sum(d_weight, axis=(0, 1)))
