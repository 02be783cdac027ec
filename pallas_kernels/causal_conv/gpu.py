"""Pallas GPU (Triton lowering) kernels of the causal depthwise conv + SiLU: forward and backward.

Every kernel runs on grid ``(row, run of R tiles of BLOCK_T positions, tile of BLOCK_C channels)``
(``R = ConvTiling.tiles_per_program``): a program loads its channels' weights once, then walks its
``R`` consecutive position tiles in a loop (whose loads Triton can pipeline, ``num_stages``). Tap
``j`` of output ``t`` is input ``t - j``: the taps of a tile of outputs are ``K`` loads of
``BLOCK_T`` rows at fixed shifts of the row itself, except in the first tile, whose taps read a
small ``[B, BLOCK_T + K - 1, C]`` copy of its inputs behind the ``K - 1`` context rows. So the
rows are read where they are, not through a padded copy (the wrapper pads the end only where the
length is not a whole number of runs of tiles); segment ids are padded like
:func:`api.pad_inputs` pads them.

- forward: ``silu(pre)``, ``pre = sum_j weight[K-1-j] tap_j`` (masked to the output's document;
  in the FLARE handoff a tap that reaches before the start of the output's block reads the clean
  stream); optionally l2-normalised per head (``HeadNorm``: a channel tile is then one head) and
  written as parts of the channels, one array each (the Gated DeltaNet's q, k, v);
- backward, first kernel: ``d_pre = dy silu'(pre)`` (pre recomputed from the taps; ``dy`` read
  from the part that holds the tile, through the normalisation's backward) stored once in
  fp32; the weight-gradient products ``d_pre tap_j`` are summed elementwise in ``K`` fp32
  ``[BLOCK_T, BLOCK_C]`` accumulators over the program's tiles and reduced over positions once,
  one partial sum per program;
- backward, second kernel: the gradient of input ``q``, ``sum_j weight[K-1-j] d_pre[q + j]`` over
  the outputs that read it (split between the row and the clean stream in the handoff), from
  ``K`` shifted loads of the stored ``d_pre``.

The gradient of the ``K - 1`` context rows (a decoding cache) is a ``[B, K-1, C]`` sum over the
first outputs, formed in XLA. Autodiff of the jnp conv instead became one XLA reduction fusion
with ten ``[T, C]`` outputs: 1.3 ms per layer at ``[4096, 6144]`` in the H200 train step
(docs/performance.md, "Train step").
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.causal_conv.reference import L2_EPS, HeadNorm, padded_segments
from pallas_kernels.gpu_tiles import dividing_tile

NO_SEGMENT = -1
F32 = jnp.float32


class ConvTiling(NamedTuple):
    """Launch parameters of the conv kernels (``benchmarks/conv.py --sweep`` times others): tile
    sizes, ``tiles_per_program`` consecutive position tiles per program, Triton's warps and
    pipeline stages."""

    block_t: int = 32
    block_c: int = 128
    num_warps: int = 4
    tiles_per_program: int = 1
    num_stages: int = 1


# H200, [4, 4096, 6144] bf16, plain / FLARE handoff (block 32), ms, of 12 tilings swept
# (docs/performance.md, "Train step"): forward 0.181 / 0.211 (32 x 128 positions x channels,
# 4 warps: 0.206 / 0.233); backward 0.645 / 0.806 (32 x 64, 4 warps; 32 x 128: 0.868 / 0.906).
FWD_TILING = ConvTiling(32, 128, 8)
BWD_TILING = ConvTiling(32, 64, 4)
# With l2-normalised heads a tile holds whole heads (128 channels): 0.752 / 0.842 ms at 8 warps.
NORM_BWD_TILING = ConvTiling(32, 128, 8)


class ConvGrads(NamedTuple):
    """Gradients of the row ``d_x [B, T, C]``, of its context rows ``d_context [B, K-1, C]``, of
    the clean stream ``d_clean [B, T, C]`` (None without handoff), and ``d_weight [K, C]`` (fp32)."""

    d_x: jax.Array
    d_context: jax.Array
    d_clean: jax.Array | None
    d_weight: jax.Array


class _Tile:
    """One tile of a program: row ``b``, positions ``[t0, t0 + BLOCK_T)`` (set by :meth:`walk`),
    channels ``cs``."""

    def __init__(self, w_ref, seg_ref, *, kernel: int, block_t: int, block_c: int,
                 block_size: int | None, tiles_per_program: int):
        self.pad, self.block_t, self.block_c = kernel - 1, block_t, block_c
        self.block_size, self.seg_ref, self.tiles_per_program = block_size, seg_ref, tiles_per_program
        self.b, c = pl.program_id(0), pl.program_id(2)
        self.t0: jax.Array | None = None
        self.c0 = pl.multiple_of(c * block_c, block_c)
        self.cs = pl.ds(self.c0, block_c)
        self.weight = [w_ref[j, self.cs].astype(F32)[None, :] for j in range(kernel)]

    def walk(self, body: Callable[[_Tile, Any], Any], init: Any) -> Any:
        """``carry = body(tile, carry)`` at the program's ``R`` consecutive tiles in turn, in a
        loop; the last carry."""
        first = pl.program_id(1) * self.tiles_per_program

        def step(k: jax.Array, carry: Any) -> Any:
            tile = copy.copy(self)
            tile.t0 = pl.multiple_of((first + k) * self.block_t, self.block_t)
            return body(tile, carry)

        return jax.lax.fori_loop(0, self.tiles_per_program, step, init)

    def zeros(self) -> jax.Array:
        return jnp.zeros((self.block_t, self.block_c), F32)

    def rows(self, ref, shift: int = 0) -> jax.Array:
        """Rows ``t0 + shift + [0, BLOCK_T)`` of a ``[B, rows, C]`` ref."""
        return ref[self.b, pl.ds(self.t0 + shift, self.block_t), self.cs]

    def store(self, ref, value: jax.Array, offset: int = 0) -> None:
        """``value`` into rows ``offset + t0 + [0, BLOCK_T)`` of a ``[B, rows, C]`` ref, in its
        dtype."""
        ref[self.b, pl.ds(self.t0 + offset, self.block_t), self.cs] = value.astype(ref.dtype)

    def _columns(self, starts: tuple[int, ...], index: int) -> pl.Slice:
        """The tile's channels as columns of part ``index`` (parts start at ``starts``)."""
        return pl.ds(self.c0 - starts[index], self.block_c)

    def store_parts(self, refs: list, starts: tuple[int, ...], value: jax.Array) -> None:
        """``value`` into the part of the channels that holds the tile's (one ref per part)."""
        ends = (*starts[1:], None)
        for index, ref in enumerate(refs):
            inside = self.c0 >= starts[index]
            if ends[index] is not None:
                inside = inside & (self.c0 < ends[index])

            cols = self._columns(starts, index)

            @pl.when(inside)
            def _(ref=ref, cols=cols):
                ref[self.b, pl.ds(self.t0, self.block_t), cols] = value.astype(ref.dtype)

    def load_parts(self, refs: list, starts: tuple[int, ...], index: int = 0) -> jax.Array:
        """The tile's rows (fp32) from the part of the channels that holds them: each load runs
        only in its own branch, so none reads out of its part."""
        def rows() -> jax.Array:
            cols = self._columns(starts, index)
            return refs[index][self.b, pl.ds(self.t0, self.block_t), cols].astype(F32)

        if index == len(refs) - 1:
            return rows()
        return jax.lax.cond(self.c0 < starts[index + 1], rows,
                            lambda: self.load_parts(refs, starts, index + 1))

    def segs(self, shift: int) -> jax.Array:
        """Padded segment ids (``K - 1`` rows before the row) from row ``t0 + shift``."""
        return self.seg_ref[self.b, pl.ds(self.t0 + shift, self.block_t)]

    def behind(self, ref, head_ref, back: int, start: int) -> jax.Array:
        """Rows ``t0 - back + [0, BLOCK_T)`` of the stream that starts at row ``start`` of
        ``ref``; the first tile reads them from ``head_ref`` (the context rows, then the first
        tile's inputs)."""
        if back == 0:
            return self.rows(ref, start)
        return jax.lax.cond(
            self.t0 == 0,
            lambda: head_ref[self.b, pl.ds(self.pad - back, self.block_t), self.cs],
            lambda: self.rows(ref, start - back))

    def crosses_block(self, positions: jax.Array, back: int) -> jax.Array | None:
        """Whether tap ``back`` of the outputs at ``positions`` reaches before their block (None
        without handoff)."""
        if not self.block_size or back == 0:
            return None
        return _crosses_block(positions, back, self.block_size)

    def taps(self, rows: _Rows) -> list[jax.Array]:
        """The masked fp32 taps ``j = 0..K-1`` of the tile's outputs."""
        own = self.segs(self.pad)
        outputs = self.t0 + jnp.arange(self.block_t)
        taps = []
        for back in range(self.pad + 1):
            tap = self.behind(rows.x, rows.x_head, back, rows.start)
            crosses = self.crosses_block(outputs, back) if rows.clean is not None else None
            if crosses is not None:
                clean = self.behind(rows.clean, rows.clean_head, back, 0)
                tap = jnp.where(crosses, clean, tap)
            same_doc = (self.segs(self.pad - back) == own)[:, None]
            taps.append(jnp.where(same_doc, tap.astype(F32), 0.0))
        return taps

    def pre(self, taps: list[jax.Array]) -> jax.Array:
        return sum(tap * self.weight[self.pad - back] for back, tap in enumerate(taps))

    def normalized(self, end_ref) -> jax.Array | None:
        """Whether the tile's channels (one head) are l2-normalised (None: no head is)."""
        if end_ref is None:
            return None
        return self.c0 < end_ref[0]


def _crosses_block(positions: jax.Array, back: int, block_size: int) -> jax.Array:
    """``[n, 1]``: whether tap ``back`` of the outputs at ``positions`` reaches before the start of
    their block of ``block_size``."""
    return (positions % block_size < back)[:, None]


def _l2_normalize(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(y / |y|, 1 / |y|)`` of every row of a tile (one head per row), fp32."""
    inv = jax.lax.rsqrt(jnp.sum(y * y, axis=1, keepdims=True) + L2_EPS)
    return y * inv, inv


class _Rows(NamedTuple):
    """Refs of the conv's inputs: the row and the first tile's copy behind the context rows, the
    same for the clean stream (None without handoff), and the row's first row in ``x`` (nonzero
    for the noisy half of a packed ``[clean ; noisy]`` row, :func:`conv_silu_fwd_pair`; the clean
    stream always starts at row 0 of its array)."""

    x: Any
    x_head: Any
    clean: Any
    clean_head: Any
    start: int


def _fwd_kernel(x_ref, x_head, clean_ref, clean_head, seg_ref, w_ref, end_ref, *out_refs,
                starts: tuple[int, ...], start: int, **shape: int | None):
    """Outputs: one ref per part of the channels (``starts``)."""
    rows = _Rows(x_ref, x_head, clean_ref, clean_head, start)

    def step(tile: _Tile, carry: tuple) -> tuple:
        y = jax.nn.silu(tile.pre(tile.taps(rows)))
        normalized = tile.normalized(end_ref)
        if normalized is not None:
            y = jnp.where(normalized, _l2_normalize(y)[0], y)
        tile.store_parts(list(out_refs), starts, y)
        return carry

    _Tile(w_ref, seg_ref, **shape).walk(step, ())


def _d_pre_kernel(x_ref, x_head, clean_ref, clean_head, seg_ref, w_ref, end_ref, *refs,
                  starts: tuple[int, ...], start: int, **shape: int | None):
    """``d_pre`` of the program's outputs (fp32) and their weight-gradient partial sum; through
    the l2 normalisation of the tile's head where it is normalised. ``refs``: the output
    cotangent, one ref per part of the channels (``starts``), then ``d_pre`` and the partial
    sums."""
    *dy_refs, dpre_ref, dw_ref = refs
    program = _Tile(w_ref, seg_ref, **shape)
    rows = _Rows(x_ref, x_head, clean_ref, clean_head, start)

    def step(tile: _Tile, sums: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        taps = tile.taps(rows)
        pre = tile.pre(taps)
        sig = jax.nn.sigmoid(pre)
        dy = tile.load_parts(dy_refs, starts)
        normalized = tile.normalized(end_ref)
        if normalized is not None:
            y_n, inv = _l2_normalize(pre * sig)
            dy = jnp.where(normalized, inv * (dy - y_n * jnp.sum(dy * y_n, axis=1, keepdims=True)), dy)
        d_pre = dy * sig * (1.0 + pre * (1.0 - sig))
        tile.store(dpre_ref, d_pre)
        return tuple(total + d_pre * tap for total, tap in zip(sums, taps, strict=True))

    sums = program.walk(step, tuple(program.zeros() for _ in range(program.pad + 1)))
    for back, total in enumerate(sums):
        dw_ref[program.pad - back, :] = jnp.sum(total, axis=0)


def _input_grads_kernel(seg_ref, w_ref, dpre_ref, noisy_dpre_ref, _written_ref, dx_ref,
                        dclean_ref=None, *, length: int, handoff_block: int | None = None,
                        start: int = 0, **shape: int | None):
    """Gradients of the tile's inputs ``q``: tap ``j`` of output ``q + j`` read them; stored from
    row ``start`` of ``dx_ref`` (``_written_ref``: the same array as an aliased input, when
    another stream's kernel has written the rest of it; not read).

    In the FLARE handoff (the launch's ``block_size``) taps that cross their output's block start
    read the clean stream: their share goes to ``dclean_ref``, or nowhere when it is None (the
    clean stream's own kernel takes it). ``noisy_dpre_ref`` (the clean stream of a FLARE pair, with
    ``handoff_block``): the noisy stream's ``d_pre``, whose outputs ``q + j`` read ``q`` across their
    block start; only those rows are loaded."""

    def step(tile: _Tile, carry: tuple) -> tuple:
        own = tile.segs(tile.pad)
        inputs = tile.t0 + jnp.arange(tile.block_t)
        d_x = d_clean = tile.zeros()
        for back in range(tile.pad + 1):
            readers = inputs + back
            valid = ((readers < length) & (tile.segs(tile.pad + back) == own))[:, None]
            weight = tile.weight[tile.pad - back]
            grad = jnp.where(valid, tile.rows(dpre_ref, back) * weight, 0.0)
            crosses = tile.crosses_block(readers, back)
            if crosses is not None:
                if dclean_ref is not None:
                    d_clean = d_clean + jnp.where(crosses, grad, 0.0)
                grad = jnp.where(crosses, 0.0, grad)
            d_x = d_x + grad
            if noisy_dpre_ref is not None and back > 0:
                reads_clean = valid & _crosses_block(readers, back, handoff_block)
                rows = noisy_dpre_ref.at[tile.b, pl.ds(tile.t0 + back, tile.block_t), tile.cs]
                mask = jnp.broadcast_to(reads_clean, (tile.block_t, tile.block_c))
                d_x = d_x + plgpu.load(rows, mask=mask, other=0.0) * weight
        tile.store(dx_ref, d_x, start)
        if dclean_ref is not None:
            tile.store(dclean_ref, d_clean)
        return carry

    _Tile(w_ref, seg_ref, **shape).walk(step, ())


class _Launch(NamedTuple):
    """Grid and static kernel arguments of one call; every array is one whole ref, but the
    weight-gradient partial sums."""

    tiles: int
    grid: tuple[int, int, int]
    static: dict
    params: plgpu.CompilerParams
    interpret: bool

    @classmethod
    def of(cls, x: jax.Array, weight: jax.Array, block_size: int | None, handoff: bool,
           tiling: ConvTiling, interpret: bool, norm: HeadNorm | None) -> _Launch:
        kernel = weight.shape[0]
        if kernel & (kernel - 1) and not interpret:
            raise ValueError(f"the GPU conv kernel needs a power-of-two conv kernel size "
                             f"(linear_conv_kernel_dim), got {kernel}")
        batch, length, channels = x.shape
        block_c = dividing_tile(channels, tiling.block_c, interpret=interpret,
                                what="the GPU conv kernel's channel count")
        if norm is not None:  # a tile is one head
            if channels % norm.head_dim or norm.head_dim & (norm.head_dim - 1):
                raise ValueError(f"l2-normalised heads of the GPU conv kernel need a power-of-two "
                                 f"head dim dividing the channels, got {norm.head_dim} of {channels}")
            block_c = norm.head_dim
        runs = pl.cdiv(pl.cdiv(length, tiling.block_t), tiling.tiles_per_program)
        static = dict(kernel=kernel, block_t=tiling.block_t, block_c=block_c,
                      block_size=block_size if handoff else None,
                      tiles_per_program=tiling.tiles_per_program)
        params = plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
        return cls(runs * tiling.tiles_per_program, (batch, runs, channels // block_c), static,
                   params, interpret)

    def call(self, body, name: str, inputs: list, out_shape: list, out_specs: list | None = None,
             aliased_input: int | None = None, **extra) -> list[jax.Array]:
        """``inputs``: arrays, or None (the kernel's ref is None); ``out_specs``: whole refs when
        None; ``aliased_input``: the position in ``inputs`` of the array that is the first
        output's buffer too."""
        aliases = {}
        if aliased_input is not None:  # pallas_call counts the inputs that are not None
            aliases[sum(a is not None for a in inputs[:aliased_input])] = 0
        return pl.pallas_call(
            functools.partial(body, **self.static, **extra), grid=self.grid,
            in_specs=[None if a is None else pl.no_block_spec for a in inputs],
            out_specs=out_specs or [pl.no_block_spec] * len(out_shape), out_shape=out_shape,
            input_output_aliases=aliases, compiler_params=self.params,
            interpret=self.interpret, name=name,
        )(*inputs)


def _extend(a: jax.Array | None, rows: int, fill=0) -> jax.Array | None:
    """``a`` with its axis 1 zero- (``fill``-) padded at the end to ``rows`` (as is if longer)."""
    if a is None or a.shape[1] >= rows:
        return a
    widths = [(0, 0), (0, rows - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, widths, constant_values=fill)


class _Inputs(NamedTuple):
    """The kernels' inputs: the rows (extended to whole runs of tiles), the first tiles' copies
    behind the context rows and the padded segment ids (extended for every shifted load)."""

    x: jax.Array
    x_head: jax.Array
    clean: jax.Array | None
    clean_head: jax.Array | None
    seg: jax.Array

    @classmethod
    def of(cls, x: jax.Array, context: jax.Array | None, clean: jax.Array | None,
           segment_ids: jax.Array, rows: int, block_t: int, pad: int,
           start: int = 0) -> _Inputs:
        """``x`` holds the row from row ``start`` (then on whole runs of tiles already)."""
        batch, _, channels = x.shape
        zeros = jnp.zeros((batch, pad, channels), x.dtype)
        x, clean = _extend(x, rows), _extend(clean, rows)

        def head(a: jax.Array, before: jax.Array, offset: int) -> jax.Array:
            return jnp.concatenate([before.astype(a.dtype), a[:, offset:offset + block_t]], axis=1)

        seg = padded_segments(segment_ids, pad)
        return cls(x, head(x, zeros if context is None else context, start), clean,
                   None if clean is None else head(clean, zeros, 0),
                   _extend(seg.astype(jnp.int32), rows + 2 * pad, NO_SEGMENT))


def _end(norm: HeadNorm | None) -> jax.Array | None:
    """The first channel not normalised, as the kernels read it (``int32 [1]``)."""
    return None if norm is None else jnp.asarray(norm.end, jnp.int32).reshape(1)


def _starts(channels: int, split_at: tuple[int, ...], block_c: int) -> tuple[int, ...]:
    """First channel of every part; the parts must hold whole channel tiles."""
    starts = (0, *split_at)
    if any(b % block_c for b in split_at) or list(starts) != sorted(set(starts)) or starts[-1] >= channels:
        raise ValueError(f"conv output parts must start at increasing multiples of the kernel's "
                         f"{block_c}-channel tile below {channels}, got {split_at}")
    return starts


class _Stream(NamedTuple):
    """One stream's launch: its grid, its kernels' inputs, its channel parts and where it starts
    in the arrays it is read from (and its input gradient written to)."""

    launch: _Launch
    inputs: _Inputs
    starts: tuple[int, ...]
    norm: HeadNorm | None
    start: int

    @classmethod
    def of(cls, x: jax.Array, context: jax.Array | None, clean: jax.Array | None,
           weight: jax.Array, segment_ids: jax.Array, block_size: int | None,
           norm: HeadNorm | None, split_at: tuple[int, ...], tiling: ConvTiling,
           interpret: bool, start: int = 0) -> _Stream:
        """The stream of ``segment_ids``' length from row ``start`` of ``x`` (and, in a handoff,
        from row 0 of ``clean``)."""
        batch, length = segment_ids.shape
        stream = jax.ShapeDtypeStruct((batch, length, x.shape[2]), x.dtype)
        launch = _Launch.of(stream, weight, block_size, clean is not None, tiling, interpret, norm)
        rows = launch.tiles * tiling.block_t
        inputs = _Inputs.of(x, context, clean, segment_ids, rows, tiling.block_t,
                            weight.shape[0] - 1, start)
        return cls(launch, inputs, _starts(x.shape[2], split_at, launch.static["block_c"]), norm,
                   start)

    @property
    def rows(self) -> int:
        """The stream's rows in the kernels: its length up to a whole number of runs of tiles."""
        return self.launch.tiles * self.launch.static["block_t"]

    def forward(self, weight: jax.Array, length: int) -> list[jax.Array]:
        """The conv + SiLU's parts, ``[B, length, width]`` each, in the inputs' dtype."""
        x = self.inputs.x
        ends = (*self.starts[1:], x.shape[2])
        outs = self.launch.call(
            _fwd_kernel, "causal_conv_fwd", [*self.inputs, weight, _end(self.norm)],
            [jax.ShapeDtypeStruct((x.shape[0], self.rows, b - a), x.dtype)
             for a, b in zip(self.starts, ends, strict=True)],
            starts=self.starts, start=self.start)
        return [out[:, :length] for out in outs]

    def d_pre(self, weight: jax.Array, d_out: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``d_pre`` (fp32, one tile past the rows: the shifted loads of the last tile's inputs
        read into it, never written; those outputs do not exist and are masked) and ``d_weight``
        ``[K, C]`` (fp32)."""
        batch, _, channels = self.inputs.x.shape
        block_t, block_c = self.launch.static["block_t"], self.launch.static["block_c"]
        taps, runs = weight.shape[0], self.launch.grid[1]
        d_pre_shape = jax.ShapeDtypeStruct((batch, self.rows + block_t, channels), F32)
        d_weight_shape = jax.ShapeDtypeStruct((batch, runs, taps, channels), F32)
        d_weight_spec = pl.BlockSpec((None, None, taps, block_c), lambda b, i, c: (b, i, 0, c))
        d_pre, d_weight = self.launch.call(
            _d_pre_kernel, "causal_conv_bwd_d_pre",
            [*self.inputs, weight, _end(self.norm), *(_extend(d, self.rows) for d in d_out)],
            [d_pre_shape, d_weight_shape], [pl.no_block_spec, d_weight_spec], starts=self.starts,
            start=self.start)
        return d_pre, jnp.sum(d_weight, axis=(0, 1))

    def input_grads(self, weight: jax.Array, d_pre: jax.Array, length: int, *,
                    write_clean: bool = False, noisy_d_pre: jax.Array | None = None,
                    handoff_block: int | None = None,
                    into: jax.Array | jax.ShapeDtypeStruct | None = None) -> list[jax.Array]:
        """The row's input gradient (and, ``write_clean``, the clean stream's share of a handoff),
        ``[B, length, C]`` in the row's dtype (see :func:`_input_grads_kernel`).

        ``into``: the gradient of the whole array the stream's inputs are rows of (from
        ``start``), returned whole: its shape, for the first stream's kernel to allocate, or
        the array another stream's kernel returned, written in place (its other rows kept)."""
        x = self.inputs.x
        stream = jax.ShapeDtypeStruct((x.shape[0], self.rows, x.shape[2]), x.dtype)
        target = stream if into is None else jax.ShapeDtypeStruct(into.shape, into.dtype)
        written = into if isinstance(into, jax.Array) else None
        grads = self.launch.call(_input_grads_kernel, "causal_conv_bwd_inputs",
                                 [self.inputs.seg, weight, d_pre, noisy_d_pre, written],
                                 [target, stream] if write_clean else [target], length=length,
                                 handoff_block=handoff_block, start=self.start,
                                 aliased_input=None if written is None else 4)
        return grads if into is not None else [g[:, :length] for g in grads]


def conv_silu_fwd(x: jax.Array, context: jax.Array | None, clean: jax.Array | None,
                  weight: jax.Array, segment_ids: jax.Array, block_size: int | None,
                  norm: HeadNorm | None = None, split_at: tuple[int, ...] = (), *,
                  tiling: ConvTiling = FWD_TILING, interpret: bool = False) -> list[jax.Array]:
    """The causal conv + SiLU of ``x [B, T, C]`` (arguments as :func:`api.causal_conv_silu`
    takes them) as one kernel: ``[B, T, C]`` in x's dtype, written as the parts of its channels
    that start at ``split_at`` (one array each)."""
    stream = _Stream.of(x, context, clean, weight, segment_ids, block_size, norm, split_at,
                        tiling, interpret)
    return stream.forward(weight, x.shape[1])


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


def conv_silu_bwd(x: jax.Array, context: jax.Array | None, clean: jax.Array | None,
                  weight: jax.Array, segment_ids: jax.Array, block_size: int | None,
                  d_out: list[jax.Array], norm: HeadNorm | None = None,
                  split_at: tuple[int, ...] = (), *, tiling: ConvTiling | None = None,
                  interpret: bool = False) -> ConvGrads:
    """Gradients of :func:`conv_silu_fwd` for the cotangents ``d_out`` of its parts
    (``[B, T, width]`` each): the row's and the clean stream's in their dtype, the context's and
    the weight's in fp32 (``tiling`` default: ``BWD_TILING``, ``NORM_BWD_TILING`` with
    ``norm``)."""
    handoff = clean is not None
    backward = _Stream.of(x, context, clean, weight, segment_ids, block_size, norm, split_at,
                          _bwd_tiling(tiling, norm), interpret)
    d_pre, d_weight = backward.d_pre(weight, d_out)
    grads = backward.input_grads(weight, d_pre, x.shape[1], write_clean=handoff)
    d_context = _context_grad(d_pre, weight, backward.inputs.seg,
                              backward.launch.static["block_size"])
    return ConvGrads(grads[0], d_context, grads[1] if handoff else None, d_weight)


def _bwd_tiling(tiling: ConvTiling | None, norm: HeadNorm | None) -> ConvTiling:
    if tiling is not None:
        return tiling
    return BWD_TILING if norm is None else NORM_BWD_TILING


def _pair_streams(row: jax.Array, weight: jax.Array, segment_ids: jax.Array, block_size: int,
                  norm: HeadNorm | None, split_at: tuple[int, ...], tiling: ConvTiling,
                  interpret: bool) -> tuple[_Stream, _Stream]:
    """The clean and the noisy stream of a FLARE row ``[clean ; noisy]`` (its shape checked by
    ``api.causal_conv_silu_pair``), read in place when each half is a whole number of runs of
    tiles, else from a copy with each half so extended."""
    length = segment_ids.shape[1]
    args = (weight, segment_ids)
    clean = _Stream.of(row, None, None, *args, None, norm, split_at, tiling, interpret)
    rows = clean.rows
    if rows != length:
        row = jnp.concatenate([_extend(row[:, :length], rows), _extend(row[:, length:], rows)],
                              axis=1)
        clean = _Stream.of(row, None, None, *args, None, norm, split_at, tiling, interpret)
    noisy = _Stream.of(row, None, row, *args, block_size, norm, split_at, tiling, interpret,
                       start=rows)
    return clean, noisy


def conv_silu_fwd_pair(row: jax.Array, weight: jax.Array, segment_ids: jax.Array,
                       block_size: int, norm: HeadNorm | None = None,
                       split_at: tuple[int, ...] = (), *, tiling: ConvTiling = FWD_TILING,
                       interpret: bool = False) -> tuple[list[jax.Array], list[jax.Array]]:
    """Both FLARE streams' convs over the row ``[B, 2T, C] = [clean ; noisy]`` (``segment_ids
    [B, T]`` of each): :func:`conv_silu_fwd` of the clean half, and of the noisy half with handoff
    from the clean one, both read in place."""
    clean, noisy = _pair_streams(row, weight, segment_ids, block_size, norm, split_at, tiling,
                                 interpret)
    length = segment_ids.shape[1]
    return clean.forward(weight, length), noisy.forward(weight, length)


def conv_silu_bwd_pair(row: jax.Array, weight: jax.Array, segment_ids: jax.Array,
                       block_size: int, d_clean_out: list[jax.Array],
                       d_noisy_out: list[jax.Array], norm: HeadNorm | None = None,
                       split_at: tuple[int, ...] = (), *, tiling: ConvTiling | None = None,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Gradients ``(d_row, d_weight)`` of :func:`conv_silu_fwd_pair` for its outputs'
    cotangents. ``d_row`` is one array: the noisy stream's input-gradient kernel writes its half,
    then the clean stream's writes the other half in place, adding the taps of noisy outputs that
    cross their block start (so the clean stream's gradient is not written twice and added)."""
    clean, noisy = _pair_streams(row, weight, segment_ids, block_size, norm, split_at,
                                 _bwd_tiling(tiling, norm), interpret)
    d_pre_clean, d_weight_clean = clean.d_pre(weight, d_clean_out)
    d_pre_noisy, d_weight_noisy = noisy.d_pre(weight, d_noisy_out)
    length = segment_ids.shape[1]
    whole = jax.ShapeDtypeStruct((row.shape[0], 2 * clean.rows, row.shape[2]), row.dtype)
    (d_noisy,) = noisy.input_grads(weight, d_pre_noisy, length, into=whole)
    (d_row,) = clean.input_grads(weight, d_pre_clean, length, noisy_d_pre=d_pre_noisy,
                                 handoff_block=block_size, into=d_noisy)
    if d_row.shape[1] != row.shape[1]:  # the halves were extended
        rows = clean.rows
        d_row = jnp.concatenate([d_row[:, :length], d_row[:, rows:rows + length]], axis=1)
    return d_row, d_weight_clean + d_weight_noisy
