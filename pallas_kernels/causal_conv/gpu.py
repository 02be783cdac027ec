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


class _Tile:
    """Loads of one program's tile: row ``b``, channels ``cs``, positions from ``q0``.

    Array index ``q0 + shift`` holds padded position ``q0 + shift - (K-1)`` (the wrapper's
    padding), so input ``q`` is at shift ``K-1`` and output ``t = q - (K-1) + k`` (padded position
    ``q + k``) at shift ``K-1+k``.
    """

    def __init__(self, kernel: int, block_c: int, block_size: int | None, w_ref, seg_ref):
        self.seg_ref = seg_ref
        self.b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        self.pad = kernel - 1
        self.q0 = pl.multiple_of(i * BLOCK_T, BLOCK_T)
        self.cs = pl.ds(pl.multiple_of(c * block_c, block_c), block_c)
        self.block_size = block_size
        self.weight = [w_ref[j, self.cs].astype(jnp.float32)[None, :] for j in range(kernel)]

    def rows(self, ref, shift: int) -> jax.Array:
        return ref[self.b, pl.ds(self.q0 + shift, BLOCK_T), self.cs]

    def segs(self, shift: int) -> jax.Array:
        return self.seg_ref[self.b, pl.ds(self.q0 + shift, BLOCK_T)]

    def offset_in_block(self, k: int) -> jax.Array | None:
        """``t % block_size`` of the outputs ``t = q - (K-1) + k`` (None without handoff)."""
        if not self.block_size:
            return None
        return (self.q0 - self.pad + k + jnp.arange(BLOCK_T)) % self.block_size

    def d_pre(self, x_ref, clean_ref, dy_ref, k: int) -> tuple[jax.Array, list[jax.Array]]:
        """``dy * silu'(pre)`` of the outputs ``t = q - (K-1) + k`` and their masked fp32 taps."""
        seg_t = self.segs(self.pad + k)
        offset = self.offset_in_block(k)
        pre = jnp.zeros((BLOCK_T, self.weight[0].shape[1]), jnp.float32)
        taps = []
        for j in range(self.pad + 1):
            tap = self.rows(x_ref, self.pad + k - j)
            if clean_ref is not None and j > 0:
                tap = jnp.where((offset < j)[:, None], self.rows(clean_ref, self.pad + k - j), tap)
            same_doc = (self.segs(self.pad + k - j) == seg_t)[:, None]
            tap = jnp.where(same_doc, tap.astype(jnp.float32), 0.0)
            pre = pre + tap * self.weight[self.pad - j]
            taps.append(tap)
        sig = jax.nn.sigmoid(pre)
        dy = self.rows(dy_ref, self.pad + k).astype(jnp.float32)
        return dy * sig * (1.0 + pre * (1.0 - sig)), taps

    def store_d_weight(self, dw_ref, d_pre: jax.Array, taps: list[jax.Array]) -> None:
        """Partial weight gradient of the outputs ``t = q`` (each output in exactly one tile)."""
        for j, tap in enumerate(taps):
            dw_ref[self.pad - j, :] = jnp.sum(d_pre * tap, axis=0)

    def add_input_grads(self, grads: tuple[jax.Array, jax.Array], d_pre: jax.Array, k: int
                        ) -> tuple[jax.Array, jax.Array]:
        """Add tap ``k`` of the outputs ``t = q - (K-1) + k`` (which read input ``q``) to the
        gradients ``(d_x, d_clean)`` of the inputs ``q``."""
        d_x, d_clean = grads
        same_doc = (self.segs(self.pad) == self.segs(self.pad + k))[:, None]
        grad = jnp.where(same_doc, d_pre * self.weight[self.pad - k], 0.0)
        if self.block_size and k > 0:
            crosses = (self.offset_in_block(k) < k)[:, None]
            d_clean = d_clean + jnp.where(crosses, grad, 0.0)
            grad = jnp.where(crosses, 0.0, grad)
        return d_x + grad, d_clean


def _store_input_grads(grads: tuple[jax.Array, jax.Array], dx_ref, dclean_ref) -> None:
    dx_ref[...] = grads[0].astype(dx_ref.dtype)
    if dclean_ref is not None:
        dclean_ref[...] = grads[1].astype(dclean_ref.dtype)


def _one_pass_kernel(x_ref, clean_ref, seg_ref, w_ref, dy_ref, dx_ref, dclean_ref, dw_ref, *,
                     kernel: int, block_c: int, block_size: int | None):
    """Everything in one program: ``d_pre`` of every output that reads the tile's inputs is
    recomputed here (``K`` times per output over the row)."""
    tile = _Tile(kernel, block_c, block_size, w_ref, seg_ref)
    zeros = jnp.zeros((BLOCK_T, block_c), jnp.float32)
    grads = (zeros, zeros)
    for k in range(kernel):
        d_pre, taps = tile.d_pre(x_ref, clean_ref, dy_ref, k)
        if k == tile.pad:
            tile.store_d_weight(dw_ref, d_pre, taps)
        grads = tile.add_input_grads(grads, d_pre, k)
    _store_input_grads(grads, dx_ref, dclean_ref)


def _d_pre_kernel(x_ref, clean_ref, seg_ref, w_ref, dy_ref, dpre_ref, dw_ref, *, kernel: int,
                  block_c: int, block_size: int | None):
    """Two passes, first: ``d_pre`` of the outputs ``t = q`` (fp32, stored at index ``t + K-1``)
    and their weight-gradient partial sum."""
    tile = _Tile(kernel, block_c, block_size, w_ref, seg_ref)
    d_pre, taps = tile.d_pre(x_ref, clean_ref, dy_ref, tile.pad)
    tile.store_d_weight(dw_ref, d_pre, taps)
    dpre_ref[tile.b, pl.ds(tile.q0 + tile.pad, BLOCK_T), tile.cs] = d_pre


def _input_grads_kernel(seg_ref, w_ref, dpre_ref, dx_ref, dclean_ref, *, kernel: int,
                        block_c: int, block_size: int | None):
    """Two passes, second: the input gradients from the stored ``d_pre`` (its first ``K-1``
    rows are never written: they belong to outputs before the row and are masked)."""
    tile = _Tile(kernel, block_c, block_size, w_ref, seg_ref)
    zeros = jnp.zeros((BLOCK_T, block_c), jnp.float32)
    grads = (zeros, zeros)
    for k in range(kernel):
        outputs_exist = (tile.q0 - tile.pad + k + jnp.arange(BLOCK_T) >= 0)[:, None]
        d_pre = jnp.where(outputs_exist, tile.rows(dpre_ref, k), 0.0)
        grads = tile.add_input_grads(grads, d_pre, k)
    _store_input_grads(grads, dx_ref, dclean_ref)


def conv_silu_bwd(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
                  padded_seg: jax.Array, block_size: int | None, d_out: jax.Array, *,
                  passes: int = 2, interpret: bool = False) -> ConvGrads:
    """Gradients of :func:`reference.conv_silu` for the output cotangent ``d_out [B, T, C]``.

    ``passes``: 1 runs one kernel that recomputes every output's ``d_pre`` once per tap reading
    it; 2 stores ``d_pre`` once (fp32) and sums its shifted copies in a second kernel (a quarter
    of the loads and sigmoids at ``K = 4``, one fp32 ``[B, T, C]`` round trip more). Two is the
    default: on the H200 the FLARE handoff backward at ``[1, 4096, 6144]`` takes 0.634 ms against
    0.712, and the 0.8B FLARE train step 204.6 / 365.6 ms against 207.2 / 372.1 at batch 1 / 2
    (``docs/performance.md``).
    """
    kernel = weight.shape[0]
    if kernel & (kernel - 1) and not interpret:
        raise ValueError(f"the GPU conv kernel needs a power-of-two conv kernel size "
                         f"(linear_conv_kernel_dim), got {kernel}")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes}")
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
    x, clean = extend(padded_x, pad), extend(padded_clean, pad) if handoff else None
    seg = extend(padded_seg.astype(jnp.int32), pad, NO_SEGMENT)
    dy = extend(d_out, 2 * pad)  # output t sits at padded position t + K - 1
    static = dict(kernel=kernel, block_c=block_c, block_size=block_size if handoff else None)
    grid = (batch, tiles, channels // block_c)
    tile = pl.BlockSpec((None, BLOCK_T, block_c), lambda b, i, c: (b, i, c))
    stream = jax.ShapeDtypeStruct((batch, tiles * BLOCK_T, channels), padded_x.dtype)
    grads_out = ([stream, stream if handoff else None], [tile, tile if handoff else None])
    d_weight_out = (jax.ShapeDtypeStruct((batch, tiles, kernel, channels), jnp.float32),
                    pl.BlockSpec((None, None, kernel, block_c), lambda b, i, c: (b, i, 0, c)))

    def call(body, name: str, inputs: list, outs: tuple[list, list]) -> list[jax.Array]:
        return pl.pallas_call(
            functools.partial(body, **static), grid=grid,
            in_specs=[None if a is None else pl.no_block_spec for a in inputs],
            out_specs=outs[1], out_shape=outs[0],
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret, name=name,
        )(*inputs)

    if passes == 1:
        d_x, d_clean, d_weight = call(
            _one_pass_kernel, "causal_conv_bwd", [x, clean, seg, weight, dy],
            (grads_out[0] + [d_weight_out[0]], grads_out[1] + [d_weight_out[1]]))
    else:
        d_pre_out = jax.ShapeDtypeStruct((batch, tiles * BLOCK_T + pad, channels), jnp.float32)
        d_pre, d_weight = call(_d_pre_kernel, "causal_conv_bwd_d_pre", [x, clean, seg, weight, dy],
                               ([d_pre_out, d_weight_out[0]], [pl.no_block_spec, d_weight_out[1]]))
        d_x, d_clean = call(_input_grads_kernel, "causal_conv_bwd_inputs", [seg, weight, d_pre],
                            grads_out)
    crop = slice(0, padded_len)
    return ConvGrads(d_x[:, crop], None if d_clean is None else d_clean[:, crop],
                     jnp.sum(d_weight, axis=(0, 1)))
