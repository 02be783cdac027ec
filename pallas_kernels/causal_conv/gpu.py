"""Pallas GPU (Triton lowering) kernels of the causal depthwise conv + SiLU: forward and backward.

Every kernel runs on grid ``(row, tile of BLOCK_T positions, tile of BLOCK_C channels)`` and reads
the padded inputs of :func:`api.pad_inputs` (``K - 1`` context rows, then the row), whose padded
row ``t + K - 1 - j`` is tap ``j`` of output ``t``: the taps of a tile of outputs are ``K`` loads
of ``BLOCK_T`` rows at fixed shifts, all in bounds, so no array is padded again (the wrapper pads
the end only where the length is not a whole number of tiles).

- forward: ``silu(pre)``, ``pre = sum_j weight[K-1-j] tap_j`` (masked to the output's document;
  in the FLARE handoff a tap that reaches before the start of the output's block reads the clean
  stream);
- backward, first kernel: ``d_pre = dy silu'(pre)`` (pre recomputed from the taps) stored once in
  fp32, and one weight-gradient partial sum per tile;
- backward, second kernel: the gradient of input ``q``, ``sum_j weight[K-1-j] d_pre[q + j]`` over
  the outputs that read it (split between the row and the clean stream in the handoff), from
  ``K`` shifted loads of the stored ``d_pre``.

The gradient of the ``K - 1`` context rows (a decoding cache) is a ``[B, K-1, C]`` sum over the
first outputs, formed in XLA. Autodiff of the jnp conv instead became one XLA reduction fusion
with ten ``[T, C]`` outputs: 1.3 ms per layer at ``[4096, 6144]`` in the H200 train step
(docs/performance.md, "Train step").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_tiles import dividing_tile

NO_SEGMENT = -1
F32 = jnp.float32


class ConvTiling(NamedTuple):
    """Launch parameters of the conv kernels (``benchmarks/conv.py --sweep`` times others)."""

    block_t: int = 32
    block_c: int = 128
    num_warps: int = 4


DEFAULT_TILING = ConvTiling()


class ConvGrads(NamedTuple):
    """Gradients of the row ``d_x [B, T, C]``, of its context rows ``d_context [B, K-1, C]``, of
    the clean stream ``d_clean [B, T, C]`` (None without handoff), and ``d_weight [K, C]`` (fp32)."""

    d_x: jax.Array
    d_context: jax.Array
    d_clean: jax.Array | None
    d_weight: jax.Array


class _Tile:
    """One program's tile: row ``b``, positions ``[t0, t0 + BLOCK_T)``, channels ``cs``."""

    def __init__(self, kernel: int, block_t: int, block_c: int, block_size: int | None, w_ref,
                 seg_ref):
        self.pad, self.block_t, self.block_size, self.seg_ref = kernel - 1, block_t, block_size, seg_ref
        self.b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        self.t0 = pl.multiple_of(i * block_t, block_t)
        self.cs = pl.ds(pl.multiple_of(c * block_c, block_c), block_c)
        self.weight = [w_ref[j, self.cs].astype(F32)[None, :] for j in range(kernel)]

    def rows(self, ref, shift: int) -> jax.Array:
        """Rows ``t0 + shift + [0, BLOCK_T)`` of a ``[B, rows, C]`` ref."""
        return ref[self.b, pl.ds(self.t0 + shift, self.block_t), self.cs]

    def segs(self, shift: int) -> jax.Array:
        return self.seg_ref[self.b, pl.ds(self.t0 + shift, self.block_t)]

    def crosses_block(self, positions: jax.Array, back: int) -> jax.Array | None:
        """Whether tap ``back`` of the outputs at ``positions`` reaches before their block (None
        without handoff)."""
        if not self.block_size or back == 0:
            return None
        return (positions % self.block_size < back)[:, None]

    def taps(self, x_ref, clean_ref) -> list[jax.Array]:
        """The masked fp32 taps ``j = 0..K-1`` of the tile's outputs."""
        own = self.segs(self.pad)
        outputs = self.t0 + jnp.arange(self.block_t)
        taps = []
        for back in range(self.pad + 1):
            tap = self.rows(x_ref, self.pad - back)
            crosses = self.crosses_block(outputs, back) if clean_ref is not None else None
            if crosses is not None:
                tap = jnp.where(crosses, self.rows(clean_ref, self.pad - back), tap)
            same_doc = (self.segs(self.pad - back) == own)[:, None]
            taps.append(jnp.where(same_doc, tap.astype(F32), 0.0))
        return taps

    def pre(self, taps: list[jax.Array]) -> jax.Array:
        return sum(tap * self.weight[self.pad - back] for back, tap in enumerate(taps))


def _fwd_kernel(x_ref, clean_ref, seg_ref, w_ref, out_ref, *, kernel: int, block_t: int,
                block_c: int, block_size: int | None):
    tile = _Tile(kernel, block_t, block_c, block_size, w_ref, seg_ref)
    out_ref[...] = jax.nn.silu(tile.pre(tile.taps(x_ref, clean_ref))).astype(out_ref.dtype)


def _d_pre_kernel(x_ref, clean_ref, seg_ref, w_ref, dy_ref, dpre_ref, dw_ref, *, kernel: int,
                  block_t: int, block_c: int, block_size: int | None):
    """``d_pre`` of the tile's outputs (fp32) and their weight-gradient partial sum."""
    tile = _Tile(kernel, block_t, block_c, block_size, w_ref, seg_ref)
    taps = tile.taps(x_ref, clean_ref)
    pre = tile.pre(taps)
    sig = jax.nn.sigmoid(pre)
    d_pre = dy_ref[...].astype(F32) * sig * (1.0 + pre * (1.0 - sig))
    dpre_ref[...] = d_pre
    for back, tap in enumerate(taps):
        dw_ref[tile.pad - back, :] = jnp.sum(d_pre * tap, axis=0)


def _input_grads_kernel(seg_ref, w_ref, dpre_ref, dx_ref, dclean_ref=None, *, kernel: int, block_t: int,
                        block_c: int, block_size: int | None, length: int):
    """Gradients of the tile's inputs ``q``: tap ``j`` of output ``q + j`` read them."""
    tile = _Tile(kernel, block_t, block_c, block_size, w_ref, seg_ref)
    own = tile.segs(tile.pad)
    inputs = tile.t0 + jnp.arange(block_t)
    d_x = d_clean = jnp.zeros((block_t, block_c), F32)
    for back in range(tile.pad + 1):
        readers = inputs + back
        valid = ((readers < length) & (tile.segs(tile.pad + back) == own))[:, None]
        grad = jnp.where(valid, tile.rows(dpre_ref, back) * tile.weight[tile.pad - back], 0.0)
        crosses = tile.crosses_block(readers, back) if dclean_ref is not None else None
        if crosses is not None:
            d_clean = d_clean + jnp.where(crosses, grad, 0.0)
            grad = jnp.where(crosses, 0.0, grad)
        d_x = d_x + grad
    dx_ref[...] = d_x.astype(dx_ref.dtype)
    if dclean_ref is not None:
        dclean_ref[...] = d_clean.astype(dclean_ref.dtype)


class _Launch(NamedTuple):
    """Grid, tile spec and static kernel arguments of one call."""

    tiles: int
    block_c: int
    static: dict
    params: plgpu.CompilerParams
    interpret: bool

    @classmethod
    def of(cls, padded_x: jax.Array, weight: jax.Array, block_size: int | None, handoff: bool,
           tiling: ConvTiling, interpret: bool) -> _Launch:
        kernel = weight.shape[0]
        if kernel & (kernel - 1) and not interpret:
            raise ValueError(f"the GPU conv kernel needs a power-of-two conv kernel size "
                             f"(linear_conv_kernel_dim), got {kernel}")
        channels = padded_x.shape[2]
        block_c = dividing_tile(channels, tiling.block_c, interpret=interpret,
                                what="the GPU conv kernel's channel count")
        length = padded_x.shape[1] - (kernel - 1)
        static = dict(kernel=kernel, block_t=tiling.block_t, block_c=block_c,
                      block_size=block_size if handoff else None)
        params = plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=1)
        return cls(pl.cdiv(length, tiling.block_t), block_c, static, params, interpret)

    def grid(self, batch: int, channels: int) -> tuple[int, int, int]:
        return batch, self.tiles, channels // self.block_c

    def tile(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.static["block_t"], self.block_c), lambda b, i, c: (b, i, c))

    def call(self, body, name: str, inputs: list, out_shape: list, out_specs: list,
             grid: tuple[int, int, int], **extra) -> list[jax.Array]:
        """``inputs``: ``(array, spec)`` pairs, spec None for a whole-array ref."""
        return pl.pallas_call(
            functools.partial(body, **self.static, **extra), grid=grid,
            in_specs=[None if a is None else pl.no_block_spec if spec is None else spec
                      for a, spec in inputs],
            out_specs=out_specs, out_shape=out_shape, compiler_params=self.params,
            interpret=self.interpret, name=name,
        )(*(a for a, _ in inputs))


def _extend(a: jax.Array | None, rows: int, fill=0) -> jax.Array | None:
    """``a`` with its axis 1 zero- (``fill``-) padded at the end to ``rows`` (as is if longer)."""
    if a is None or a.shape[1] >= rows:
        return a
    widths = [(0, 0), (0, rows - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, widths, constant_values=fill)


def _tiled_inputs(padded_x, padded_clean, padded_seg, tiles: int, block_t: int, pad: int):
    """The padded inputs, extended so that every tile's shifted loads are in bounds."""
    rows = tiles * block_t + pad
    seg = _extend(padded_seg.astype(jnp.int32), rows + pad, NO_SEGMENT)
    return _extend(padded_x, rows), _extend(padded_clean, rows), seg


def conv_silu_fwd(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
                  padded_seg: jax.Array, block_size: int | None, *,
                  tiling: ConvTiling = DEFAULT_TILING, interpret: bool = False) -> jax.Array:
    """:func:`reference.conv_silu` (same arguments) as one kernel: ``[B, T, C]`` in x's dtype."""
    handoff = padded_clean is not None
    launch = _Launch.of(padded_x, weight, block_size, handoff, tiling, interpret)
    batch, padded_len, channels = padded_x.shape
    pad = weight.shape[0] - 1
    x, clean, seg = _tiled_inputs(padded_x, padded_clean, padded_seg, launch.tiles, tiling.block_t, pad)
    out_rows = launch.tiles * tiling.block_t
    (out,) = launch.call(
        _fwd_kernel, "causal_conv_fwd", [(x, None), (clean, None), (seg, None), (weight, None)],
        [jax.ShapeDtypeStruct((batch, out_rows, channels), padded_x.dtype)], [launch.tile()],
        launch.grid(batch, channels))
    return out[:, :padded_len - pad]


def _context_grad(d_pre: jax.Array, weight: jax.Array, padded_seg: jax.Array,
                  block_size: int | None) -> jax.Array:
    """``[B, K-1, C]``: context row ``c`` is tap ``K-1-c+t`` of the first outputs ``t < K-1``
    (unless that tap crosses into the clean stream)."""
    pad = weight.shape[0] - 1
    length = d_pre.shape[1]
    rows = []
    for c in range(pad):
        grad = jnp.zeros((d_pre.shape[0], d_pre.shape[2]), F32)
        for t in range(min(c + 1, length)):
            back = pad - c + t
            same_doc = (padded_seg[:, c] == padded_seg[:, t + pad])[:, None]
            reads_row = not block_size or t % block_size >= back
            if reads_row:
                grad = grad + jnp.where(same_doc, d_pre[:, t] * weight[pad - back].astype(F32), 0.0)
        rows.append(grad)
    return jnp.stack(rows, axis=1)


def conv_silu_bwd(padded_x: jax.Array, padded_clean: jax.Array | None, weight: jax.Array,
                  padded_seg: jax.Array, block_size: int | None, d_out: jax.Array, *,
                  tiling: ConvTiling = DEFAULT_TILING, interpret: bool = False) -> ConvGrads:
    """Gradients of :func:`reference.conv_silu` for the output cotangent ``d_out [B, T, C]``:
    the row's and the clean stream's in their dtype, the context's and the weight's in fp32."""
    handoff = padded_clean is not None
    launch = _Launch.of(padded_x, weight, block_size, handoff, tiling, interpret)
    batch, padded_len, channels = padded_x.shape
    pad = weight.shape[0] - 1
    length = padded_len - pad
    block_t = tiling.block_t
    x, clean, seg = _tiled_inputs(padded_x, padded_clean, padded_seg, launch.tiles, block_t, pad)
    rows = launch.tiles * block_t
    grid, tile = launch.grid(batch, channels), launch.tile()
    # One tile more than the outputs: the shifted loads of the last tile's inputs read into it
    # (never written; those outputs do not exist and are masked).
    d_pre_shape = jax.ShapeDtypeStruct((batch, rows + block_t, channels), F32)
    d_weight_out = (jax.ShapeDtypeStruct((batch, launch.tiles, pad + 1, channels), F32),
                    pl.BlockSpec((None, None, pad + 1, launch.block_c), lambda b, i, c: (b, i, 0, c)))
    d_pre, d_weight = launch.call(
        _d_pre_kernel, "causal_conv_bwd_d_pre",
        [(x, None), (clean, None), (seg, None), (weight, None), (_extend(d_out, rows), tile)],
        [d_pre_shape, d_weight_out[0]], [tile, d_weight_out[1]], grid)
    stream = jax.ShapeDtypeStruct((batch, rows, channels), padded_x.dtype)
    grads = launch.call(
        _input_grads_kernel, "causal_conv_bwd_inputs", [(seg, None), (weight, None), (d_pre, None)],
        [stream, stream] if handoff else [stream], [tile, tile] if handoff else [tile], grid,
        length=length)
    d_context = _context_grad(d_pre, weight, padded_seg, launch.static["block_size"])
    return ConvGrads(grads[0][:, :length], d_context, grads[1][:, :length] if handoff else None,
                     jnp.sum(d_weight, axis=(0, 1)))
