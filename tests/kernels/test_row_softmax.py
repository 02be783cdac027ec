"""The row-softmax kernel (pallas_kernels.row_softmax) in interpret mode against its oracle (XLA
in fp32): the logsumexp, the exponentials and their offsets, at row and column tails (shifted last
tiles), arrays smaller than one tile, bf16 and fp32 inputs, -inf entries, offset hints, rows that
need the second walk; and the GPU path lowers to Triton IR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.row_softmax import gpu, reference, row_softmax

# fp32 on both sides from the same stored values: the kernel sums exp(x - m) over tiles, the
# oracle over the row at once, so they differ by fp32 rounding of a sum of a few thousand terms
# (seen: 2e-6 at |lse| ~ 20); a tile counted twice or skipped moves the result by log(1 + share
# of the mass), far above this for these inputs.
ATOL, RTOL = 1e-5, 1e-6
SMALL = gpu.Tiling(block_rows=4, block_cols=128)


def _check(x: jax.Array, got, exp_dtype=jnp.float32) -> None:
    """``got`` is self-consistent (exp = exp(x - offset), offset near the row max) and its
    logsumexp is the oracle's."""
    want_exp, want_lse, row_max = reference.row_softmax(x, exp_dtype)
    np.testing.assert_allclose(got.lse, want_lse, atol=ATOL, rtol=RTOL)
    assert np.all(np.abs(np.asarray(got.offset - row_max)) <= gpu.HEADROOM)
    if exp_dtype is not None:
        assert got.exp.shape == x.shape and got.exp.dtype == exp_dtype
        expected = jnp.exp(x.astype(jnp.float32) - got.offset[:, None]).astype(exp_dtype)
        # fp32 exponentials of the same differences; bf16: the same rounding of them
        np.testing.assert_allclose(np.asarray(got.exp, np.float32),
                                   np.asarray(expected, np.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(8, 512), (9, 300), (3, 1000), (2, 50), (64, 129)],
                         ids=["whole_tiles", "both_tails", "few_rows", "below_one_tile",
                              "one_column_over"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_the_oracle(shape, dtype):
    x = (6.0 * jax.random.normal(jax.random.key(0), shape) + 3.0).astype(dtype)
    got = row_softmax(x, exp_dtype=jnp.float32, backend="gpu_interpret", tiling=SMALL)
    assert got.lse.shape == shape[:1] and got.lse.dtype == jnp.float32
    _check(x, got)
    lse_only = row_softmax(x, backend="gpu_interpret", tiling=SMALL)
    assert lse_only.exp is None
    np.testing.assert_array_equal(lse_only.lse, got.lse)


def test_default_tiling_at_a_head_like_width():
    # the default 1 x 4096 tiles over 10000 ids: two whole tiles and a shifted, masked tail
    x = (4.0 * jax.random.normal(jax.random.key(1), (3, 10000))).astype(jnp.bfloat16)
    _check(x, row_softmax(x, exp_dtype=jnp.bfloat16, backend="gpu_interpret"), jnp.bfloat16)


def test_offsets_follow_the_hint_and_far_rows_walk_again():
    x = 3.0 * jax.random.normal(jax.random.key(2), (8, 300))
    x = x.at[:4, 200].set(20.0)  # rows 0-3: the max far from the first tile's, in the tail
    hint = jnp.full((8,), -jnp.inf).at[0].set(x[0, 200]).at[4].set(x[4, 250])
    hint = hint.at[5].set(-90.0)  # below the first tile's max: not taken
    got = row_softmax(x, hint, exp_dtype=jnp.float32, backend="gpu_interpret",
                      tiling=gpu.Tiling(block_rows=2, block_cols=128))
    _check(x, got)
    first_tile = jnp.max(x[:, :128], axis=1)
    # rows 0-1 share a block: the hint holds row 0 within the headroom, row 1's first tile does
    # not (20 - ~9 > 30 is false, so no second walk): the offsets are the single walk's
    np.testing.assert_array_equal(got.offset[:2], [x[0, 200], first_tile[1]])
    # row 4's hint is its largest entry of the tail or not: the larger of it and the first tile
    np.testing.assert_array_equal(got.offset[4:6], [max(x[4, 250], first_tile[4]), first_tile[5]])
    # a row 60 above its first tile sends its block through the second walk: offsets = row maxes
    far = x.at[6, 290].set(first_tile[6] + 60.0)
    again = row_softmax(far, hint, exp_dtype=jnp.float32, backend="gpu_interpret",
                        tiling=gpu.Tiling(block_rows=2, block_cols=128))
    _check(far, again)
    np.testing.assert_array_equal(again.offset[6:], jnp.max(far[6:], axis=1))
    np.testing.assert_array_equal(again.offset[:6], got.offset[:6])


def test_neg_inf_entries():
    x = 4.0 * jax.random.normal(jax.random.key(3), (6, 300))
    x = jnp.where(jax.random.bernoulli(jax.random.key(4), 0.7, x.shape), -jnp.inf, x)
    x = x.at[0].set(-jnp.inf).at[0, 299].set(2.5)  # one finite entry, in the tail tile
    x = x.at[1].set(-jnp.inf).at[1, 0].set(-7.0)  # one finite entry, in the first tile
    got = row_softmax(x, exp_dtype=jnp.float32, backend="gpu_interpret", tiling=SMALL)
    _check(x, got)
    np.testing.assert_allclose(got.lse[:2], [2.5, -7.0], rtol=RTOL)


def test_large_offsets():
    x = 3e4 + 3.0 * jax.random.normal(jax.random.key(5), (5, 700))
    got = row_softmax(x, exp_dtype=jnp.float32, backend="gpu_interpret", tiling=SMALL)
    np.testing.assert_allclose(got.lse, reference.row_softmax(x, None)[1], atol=0, rtol=RTOL)
    _check(x, got)


def test_other_backends_run_the_oracle_and_bad_shapes_are_refused():
    x = jax.random.normal(jax.random.key(6), (4, 33))
    got = row_softmax(x, exp_dtype=jnp.bfloat16, backend="reference")
    for a, b in zip(got, reference.row_softmax(x, jnp.bfloat16), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"expects x \[N, V\]"):
        row_softmax(x[None], backend="gpu_interpret")
    with pytest.raises(ValueError, match=r"offset \[N\]"):
        row_softmax(x, jnp.zeros(3), backend="gpu_interpret")


@pytest.mark.parametrize("exp_dtype", [None, jnp.bfloat16])
def test_gpu_kernel_lowers_to_triton(exp_dtype):
    """The kernel lowers for CUDA to Triton IR on this CPU-only machine at the head's shape (one
    cross-entropy step, bf16); compiling the IR to PTX needs the device
    (``benchmarks/row_softmax.py``)."""
    x = jax.ShapeDtypeStruct((4096, 248320), jnp.bfloat16)
    offset = jax.ShapeDtypeStruct((4096,), jnp.float32)
    text = jax.jit(lambda x, o: row_softmax(x, o, exp_dtype=exp_dtype, backend="gpu")).trace(
        x, offset).lower(lowering_platforms=("cuda",)).as_text()
    assert "row_softmax" in text and "triton" in text.lower()
