"""Causal depthwise conv + SiLU: the jnp reference against a per-position loop, and the Pallas GPU
forward and backward (interpret mode) against the reference and its autodiff: gradients of the
inputs, the weight, the decoding context and, in FLARE handoff, the clean stream; packed
documents; lengths that are not a multiple of the kernel's tile, or of a program's run of tiles;
the Triton lowering; the FLARE pair (both streams' convs as one op, the clean stream's gradient
from both summed in its kernel) against two calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.causal_conv import gpu, reference
from pallas_kernels.causal_conv.api import causal_conv_silu, causal_conv_silu_pair, pad_inputs

KERNEL = 4
# fp32 throughout; kernel and autodiff sum the same products in another order.
TOL = dict(rtol=1e-5, atol=1e-5)


def case(batch=2, length=37, channels=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, length, channels))
    clean = jax.random.normal(keys[1], (batch, length, channels))
    context = jax.random.normal(keys[2], (batch, KERNEL - 1, channels))
    weight = jax.random.normal(keys[3], (KERNEL, channels))
    cotangent = jax.random.normal(keys[4], (batch, length, channels))
    # Row 0: documents of 5, 13, 3 and the rest (boundaries inside and on blocks of 4 and 8);
    # further rows: one document.
    first = np.repeat(np.arange(4), [5, 13, 3, length - 21])
    segment_ids = jnp.asarray(np.stack([first] + [np.zeros(length, int)] * (batch - 1)), jnp.int32)
    return x, clean, context, weight, cotangent, segment_ids


def loop_conv_silu(x, weight, segment_ids, context, clean, block_size):
    """The definition, one output at a time (numpy, fp64)."""
    x, weight, context = (np.asarray(a, np.float64) for a in (x, weight, context))
    clean = None if clean is None else np.asarray(clean, np.float64)
    seg = np.asarray(segment_ids)
    batch, length, channels = x.shape
    out = np.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            for back in range(KERNEL):
                s = t - back
                if seg[b, max(s, 0)] != seg[b, t]:  # the context is the first token's document
                    continue
                if clean is not None and t % block_size < back:
                    source = clean[b, s] if s >= 0 else np.zeros(channels)
                else:
                    source = x[b, s] if s >= 0 else context[b, KERNEL - 1 + s]
                out[b, t] += weight[KERNEL - 1 - back] * source
    return out / (1.0 + np.exp(-out))


@pytest.mark.parametrize("block_size", [None, 4, 8])
def test_reference_matches_per_position_loop(block_size):
    x, clean, context, weight, _, segment_ids = case()
    handoff = {} if block_size is None else dict(clean=clean, block_size=block_size)
    got = causal_conv_silu(x, weight, segment_ids, context=context, backend="reference", **handoff)
    want = loop_conv_silu(x, weight, segment_ids, context, handoff.get("clean"), block_size)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("block_size,length,channels", [
    (None, 37, 32),   # tiles of 16 positions: the last one partly past the end
    (4, 37, 32),      # handoff, blocks smaller than the tile
    (32, 70, 24),     # handoff, blocks larger than the tile; channels not a power of two
])
def test_gpu_backward_matches_autodiff(block_size, length, channels):
    x, clean, context, weight, cotangent, segment_ids = case(length=length, channels=channels)

    def loss(backend, x, weight, context, clean):
        handoff = {} if block_size is None else dict(clean=clean, block_size=block_size)
        out = causal_conv_silu(x, weight, segment_ids, context=context, backend=backend,
                               **handoff)
        return jnp.sum(out * cotangent), out

    args = (x, weight, context, clean)
    (got, got_out) = jax.grad(loss, (1, 2, 3, 4), has_aux=True)("gpu_interpret", *args)
    (want, want_out) = jax.grad(loss, (1, 2, 3, 4), has_aux=True)("reference", *args)
    np.testing.assert_allclose(got_out, want_out, **TOL)  # kernel forward vs the jnp one
    for name, a, b in zip(("x", "weight", "context", "clean"), got, want, strict=True):
        np.testing.assert_allclose(a, b, err_msg=name, **TOL)
    if block_size is None:
        assert np.any(got[2])  # the context's taps were used
    else:
        assert np.any(got[3])  # the handoff taps read the clean stream


# The last three walk 2 or 4 position tiles per program (70 positions: 5, 5 and 3 tiles, padded
# to 6, 8 and 4); interpret mode ignores the pipeline stages.
TILINGS = [gpu.ConvTiling(16, 16, 4), gpu.ConvTiling(32, 32, 4), gpu.ConvTiling(64, 16, 8),
           gpu.ConvTiling(16, 16, 4, tiles_per_program=2, num_stages=2),
           gpu.ConvTiling(16, 32, 4, tiles_per_program=4, num_stages=2),
           gpu.ConvTiling(32, 16, 8, tiles_per_program=4)]


def assert_near(got, want, dtype):
    """fp32: ``TOL``. bf16: relative L2 error within 1e-2 (both round the output and the
    gradients to bf16 and sum in fp32, in another order; measured at most 3.4e-3)."""
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, **TOL)
    else:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)


def check_kernels(block_size, tiling, channels, norm=None, split_at=(), dtype=jnp.float32):
    """Forward and backward kernels (interpret mode) on 70 positions (the last tile partly past
    the end at every tile size, runs of tiles padded past it): outputs, and gradients of the row,
    the context rows, the clean stream and the weight, against the jnp forward and its autodiff
    on the padded inputs (inputs and cotangent in ``dtype``)."""
    x, clean, context, weight, cotangent, segment_ids = case(length=70, channels=channels)
    x, clean, context, weight, cotangent = (a.astype(dtype) for a in (x, clean, context, weight, cotangent))
    handoff = None if block_size is None else clean
    parts = gpu.conv_silu_fwd(x, context, handoff, weight, segment_ids, block_size, norm, split_at,
                              tiling=tiling, interpret=True)
    grads = gpu.conv_silu_bwd(x, context, handoff, weight, segment_ids, block_size,
                              jnp.split(cotangent, split_at, axis=-1), norm, split_at,
                              tiling=tiling, interpret=True)
    padded_x, padded_clean, padded_seg = pad_inputs(x, segment_ids, KERNEL, context=context,
                                                    clean=handoff)

    def forward(padded_x, padded_clean, weight):
        return reference.conv_silu(padded_x, padded_clean, weight, padded_seg, block_size, norm)

    assert_near(jnp.concatenate(parts, axis=-1), forward(padded_x, padded_clean, weight), dtype)
    want = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32) * cotangent), (0, 1, 2))(
        padded_x, padded_clean, weight)
    pad = KERNEL - 1
    assert_near(grads.d_x, want[0][:, pad:], dtype)
    assert_near(grads.d_context, want[0][:, :pad], dtype)
    assert_near(grads.d_weight, want[2], dtype)
    if block_size is not None:
        assert_near(grads.d_clean, want[1][:, pad:], dtype)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("block_size", [None, 4, 32])
def test_kernels_match_reference_at_every_tiling(block_size, tiling):
    """The kernels at the tilings ``benchmarks/conv.py --sweep`` times (``check_kernels``)."""
    check_kernels(block_size, tiling, channels=32)


@pytest.mark.parametrize("tiling", [gpu.ConvTiling(16, 16, 4), gpu.ConvTiling(32, 16, 8, 2)])
@pytest.mark.parametrize("block_size", [None, 4])
def test_kernels_with_normalized_heads_match_autodiff(block_size, tiling):
    """The first 2 of 3 heads (16 channels each) l2-normalised, the end given as an int32
    scalar (as a channel shard computes it), the output written as three arrays and the
    cotangent read from three (as q, k and v)."""
    check_kernels(block_size, tiling, 48, reference.HeadNorm(16, jnp.int32(32)), (16, 32))


@pytest.mark.parametrize("block_size", [None, 4])
def test_bf16_kernels_stay_near_fp32_autodiff(block_size):
    """bf16 inputs, as the model runs them (normalised heads, three parts): within 1e-2 of the
    jnp forward and its autodiff (``assert_near``)."""
    check_kernels(block_size, gpu.ConvTiling(16, 16, 4), 48, reference.HeadNorm(16, jnp.int32(32)),
                  (16, 32), dtype=jnp.bfloat16)


@pytest.mark.parametrize("block_size", [None, 32])
def test_gpu_path_lowers_to_triton(block_size):
    """Forward and backward through the custom VJP are three Triton kernels, lowered for CUDA on
    this CPU-only machine; also as the model calls it (normalised heads, three parts)."""
    x = jnp.zeros((2, 64, 256), jnp.bfloat16)
    weight = jnp.zeros((KERNEL, 256))
    segment_ids = jnp.zeros((2, 64), jnp.int32)
    clean = None if block_size is None else x

    def grads(x, weight, clean):
        handoff = {} if clean is None else dict(clean=clean, block_size=block_size)
        return jax.grad(lambda x, w: jnp.sum(causal_conv_silu(
            x, w, segment_ids, backend="gpu", **handoff).astype(jnp.float32)), (0, 1))(x, weight)

    def split_grads(x, weight, clean):  # the model's call: q, k normalised, three parts
        handoff = {} if clean is None else dict(clean=clean, block_size=block_size)
        return jax.grad(lambda x, w: sum(jnp.sum(part.astype(jnp.float32)) for part in causal_conv_silu(
            x, w, segment_ids, norm=reference.HeadNorm(64, 128), split_at=(64, 128), backend="gpu",
            **handoff)), (0, 1))(x, weight)

    for fn in (grads, split_grads):
        text = jax.jit(fn).trace(x, weight, clean).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("block_size", [None, 32])
def test_kernels_lower_to_triton_walking_tiles(block_size):
    """The three kernels at 4 position tiles per program, 2 pipeline stages (100 positions: 7 tiles
    of 16, padded to 2 programs of 4), lowered for CUDA: grid and stages as asked."""
    x = jnp.zeros((2, 100, 256), jnp.bfloat16)
    weight = jnp.zeros((KERNEL, 256))
    segment_ids = jnp.zeros((2, 100), jnp.int32)
    clean = None if block_size is None else x
    tiling = gpu.ConvTiling(16, 64, 4, tiles_per_program=4, num_stages=2)

    def kernels(x, clean, weight, d_out):
        return (gpu.conv_silu_fwd(x, None, clean, weight, segment_ids, block_size, tiling=tiling),
                gpu.conv_silu_bwd(x, None, clean, weight, segment_ids, block_size, [d_out],
                                  tiling=tiling))

    text = jax.jit(kernels).trace(x, clean, weight, x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert text.count("grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 4 : i32") == 3
    assert text.count("num_stages = 2 : i32") == 3


def pair_case(length=70, channels=48):
    """A FLARE pair: the clean and noisy streams, the weight, a cotangent for each stream's
    output and packed documents (``case``)."""
    noisy, clean, _, weight, cotangent, segment_ids = case(length=length, channels=channels)
    cotangent_clean = jax.random.normal(jax.random.key(7), cotangent.shape)
    return clean, noisy, weight, cotangent_clean, cotangent, segment_ids


def two_calls(clean, noisy, weight, segment_ids, block_size, **kw):
    """The pair as two reference calls: the clean stream, then the noisy one with handoff."""
    return (causal_conv_silu(clean, weight, segment_ids, backend="reference", **kw),
            causal_conv_silu(noisy, weight, segment_ids, clean=clean, block_size=block_size,
                             backend="reference", **kw))


@pytest.mark.parametrize("tiling", [gpu.ConvTiling(16, 16, 4), gpu.ConvTiling(32, 16, 8, 2),
                                    gpu.ConvTiling(16, 16, 4, tiles_per_program=4, num_stages=2)])
@pytest.mark.parametrize("block_size", [4, 16, 32])
@pytest.mark.parametrize("length", [64, 70])
def test_pair_kernels_match_two_calls(length, block_size, tiling):
    """The pair's kernels (interpret mode; normalised heads, three parts; blocks smaller than,
    equal to and larger than the tile) over the packed row ``[clean ; noisy]``, read in place
    (64 positions: whole runs of tiles) or through a copy with each half extended (70), against
    two reference calls and their autodiff: the clean half's gradient holds the noisy outputs'
    handoff taps, the noisy half's does not."""
    clean, noisy, weight, cot_clean, cot_noisy, segment_ids = pair_case(length)
    row = jnp.concatenate([clean, noisy], axis=1)
    norm, split_at = reference.HeadNorm(16, jnp.int32(32)), (16, 32)
    outs = gpu.conv_silu_fwd_pair(row, weight, segment_ids, block_size, norm, split_at,
                                  tiling=tiling, interpret=True)
    d_row, d_weight = gpu.conv_silu_bwd_pair(
        row, weight, segment_ids, block_size, jnp.split(cot_clean, split_at, axis=-1),
        jnp.split(cot_noisy, split_at, axis=-1), norm, split_at, tiling=tiling, interpret=True)

    expected = two_calls(clean, noisy, weight, segment_ids, block_size, norm=norm)
    for name, parts, want in zip(("clean", "noisy"), outs, expected, strict=True):
        np.testing.assert_allclose(jnp.concatenate(parts, axis=-1), want, err_msg=name, **TOL)

    def loss(clean, noisy, weight, with_noisy=True):
        out_clean, out_noisy = two_calls(clean, noisy, weight, segment_ids, block_size, norm=norm)
        return jnp.sum(out_clean * cot_clean) + with_noisy * jnp.sum(out_noisy * cot_noisy)

    d_clean, d_noisy, want_weight = jax.grad(loss, (0, 1, 2))(clean, noisy, weight)
    assert d_row.shape == row.shape
    np.testing.assert_allclose(d_row[:, :length], d_clean, err_msg="clean", **TOL)
    np.testing.assert_allclose(d_row[:, length:], d_noisy, err_msg="noisy", **TOL)
    np.testing.assert_allclose(d_weight, want_weight, err_msg="weight", **TOL)
    clean_only = jax.grad(loss)(clean, noisy, weight, False)
    assert not np.allclose(d_row[:, :length], clean_only, **TOL)  # the handoff taps were added


@pytest.mark.parametrize("split_at", [None, (16, 32)])
def test_pair_through_the_public_function(split_at):
    """``causal_conv_silu_pair``: the GPU path (interpret mode, one custom VJP) equals two
    reference calls in outputs and gradients; the reference backend is those two calls."""
    clean, noisy, weight, cot_clean, cot_noisy, segment_ids = pair_case(length=37)
    norm = reference.HeadNorm(16, 32)

    def loss(backend, clean, noisy, weight):
        row = jnp.concatenate([clean, noisy], axis=1)
        outs = causal_conv_silu_pair(row, weight, segment_ids, block_size=8, norm=norm,
                                     split_at=split_at, backend=backend)
        if split_at is not None:
            outs = tuple(jnp.concatenate(parts, axis=-1) for parts in outs)
        return jnp.sum(outs[0] * cot_clean) + jnp.sum(outs[1] * cot_noisy), outs

    got, got_outs = jax.grad(loss, (1, 2, 3), has_aux=True)("gpu_interpret", clean, noisy, weight)
    want, want_outs = jax.grad(loss, (1, 2, 3), has_aux=True)("reference", clean, noisy, weight)
    expected = two_calls(clean, noisy, weight, segment_ids, 8, norm=norm)
    for a, b, c in zip(got_outs, want_outs, expected, strict=True):
        np.testing.assert_allclose(a, c, **TOL)
        np.testing.assert_allclose(b, c, **TOL)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    with pytest.raises(ValueError, match="needs a positive block_size, got 0"):
        causal_conv_silu_pair(clean, weight, segment_ids, block_size=0)
    with pytest.raises(ValueError, match=r"row must be \[B, 2T, C\] for segment_ids"):
        causal_conv_silu_pair(clean, weight, segment_ids, block_size=8)


def test_pair_lowers_to_six_triton_kernels():
    """The pair through its custom VJP, lowered for CUDA: two forward kernels, then a ``d_pre``
    and an input-gradient kernel per stream, the second writing into the first's output (aliased);
    the row's halves are read in place (no slice or concatenation of them)."""
    row = jnp.zeros((2, 128, 256), jnp.bfloat16)
    weight = jnp.zeros((KERNEL, 256))
    segment_ids = jnp.zeros((2, 64), jnp.int32)

    def grads(row, weight):
        def loss(row, weight):
            parts = causal_conv_silu_pair(row, weight, segment_ids, block_size=32,
                                          norm=reference.HeadNorm(64, 128), split_at=(64, 128),
                                          backend="gpu")
            return sum(jnp.sum(p.astype(jnp.float32)) for out in parts for p in out)
        return jax.grad(loss, (0, 1))(row, weight)

    text = jax.jit(grads).trace(row, weight).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 6
    assert text.count("output_operand_aliases") == 1
    # neither half is copied out of the row, nor are the halves' gradients concatenated
    assert "-> tensor<2x64x256xbf16>" not in text


def test_handoff_without_block_size_is_an_error():
    x = jnp.zeros((1, 8, 16))
    with pytest.raises(ValueError, match="needs a positive block_size, got None"):
        causal_conv_silu(x, jnp.zeros((KERNEL, 16)), jnp.zeros((1, 8), jnp.int32), clean=x)


@pytest.mark.parametrize("kernel,channels,message", [
    (KERNEL, 24, "channel count must be a multiple of 16, got 24"),
    (3, 32, "power-of-two conv kernel size \\(linear_conv_kernel_dim\\), got 3"),
])
def test_gpu_backward_rejects_shapes_off_its_tiles(kernel, channels, message):
    x = jnp.zeros((1, 8, channels))
    with pytest.raises(ValueError, match=message):
        gpu.conv_silu_bwd(x, None, None, jnp.zeros((kernel, channels)),
                          jnp.zeros((1, 8), jnp.int32), None, [x])
    with pytest.raises(ValueError, match=message):
        gpu.conv_silu_fwd(x, None, None, jnp.zeros((kernel, channels)),
                          jnp.zeros((1, 8), jnp.int32), None)


@pytest.mark.parametrize("end", [0, 16, 48, 64])
def test_reference_normalizes_the_heads_below_end(end):
    """Heads of 16 channels that start below ``end`` are l2-normalised, the others untouched."""
    y = jax.random.normal(jax.random.key(3), (2, 5, 64))
    got = reference.normalize_heads(y, reference.HeadNorm(16, end))
    for head in range(4):
        block = y[..., 16 * head:16 * (head + 1)]
        want = block / jnp.sqrt(jnp.sum(block * block, -1, keepdims=True) + reference.L2_EPS)
        np.testing.assert_allclose(got[..., 16 * head:16 * (head + 1)],
                                   want if 16 * head < end else block, **TOL)


def test_normalized_heads_through_the_public_function():
    """``causal_conv_silu(norm=..., split_at=...)``: the GPU path (interpret mode, custom VJP,
    parts of 16, 32 and 16 channels) and the reference backend agree in outputs and gradients;
    a head dim that does not divide the channels, and parts off the channel tiles, are errors
    on the GPU path."""
    x, _, context, weight, cotangent, segment_ids = case(length=37, channels=64)
    norm = reference.HeadNorm(16, 32)

    def loss(backend, x, weight):
        parts = causal_conv_silu(x, weight, segment_ids, context=context, norm=norm,
                                 split_at=(16, 48), backend=backend)
        out = jnp.concatenate(parts, axis=-1)
        return jnp.sum(out * cotangent * jnp.arange(64) / 64), out  # per-channel weights of order 1

    (got, got_out), (want, want_out) = (
        jax.grad(loss, (1, 2), has_aux=True)(b, x, weight) for b in ("gpu_interpret", "reference"))
    np.testing.assert_allclose(got_out, want_out, **TOL)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    with pytest.raises(ValueError, match="head dim dividing the channels, got 24 of 64"):
        causal_conv_silu(x, weight, segment_ids, norm=reference.HeadNorm(24, 32), backend="gpu")
    with pytest.raises(ValueError, match="multiples of the kernel's 16-channel tile below 64, got"):
        causal_conv_silu(x, weight, segment_ids, norm=norm, split_at=(8,), backend="gpu")
