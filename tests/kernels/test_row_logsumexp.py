"""The row-logsumexp kernel (pallas_kernels.row_logsumexp) in interpret mode against its oracle,
jax.nn.logsumexp in fp32: row and column tails (shifted last tiles), arrays smaller than one tile,
bf16 and fp32 inputs, -inf entries and rows; and the GPU path lowers to Triton IR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.row_logsumexp import gpu, reference, row_logsumexp

# fp32 on both sides from the same stored values: the kernel sums exp(x - running max) per tile
# and rescales at each new max, the oracle sums exp(x - max) once, so they differ by fp32 rounding
# of a sum of a few thousand terms (seen: 2e-6 at |lse| ~ 20); a tile counted twice or skipped
# moves the result by log(1 + share of the mass), far above this for these inputs.
ATOL, RTOL = 1e-5, 1e-6
SMALL = gpu.Tiling(block_rows=4, block_cols=128)


@pytest.mark.parametrize("shape", [(8, 512), (9, 300), (3, 1000), (2, 50), (64, 129)],
                         ids=["whole_tiles", "both_tails", "few_rows", "below_one_tile",
                              "one_column_over"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_the_oracle(shape, dtype):
    x = (6.0 * jax.random.normal(jax.random.key(0), shape) + 3.0).astype(dtype)
    got = row_logsumexp(x, backend="gpu_interpret", tiling=SMALL)
    assert got.shape == shape[:1] and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference.row_logsumexp(x), atol=ATOL, rtol=RTOL)


def test_default_tiling_at_a_head_like_width():
    # the default 1 x 4096 tiles over 10000 ids: two whole tiles and a shifted, masked tail
    x = (4.0 * jax.random.normal(jax.random.key(1), (3, 10000))).astype(jnp.bfloat16)
    np.testing.assert_allclose(row_logsumexp(x, backend="gpu_interpret"),
                               reference.row_logsumexp(x), atol=ATOL, rtol=RTOL)


def test_neg_inf_entries_and_rows():
    x = 4.0 * jax.random.normal(jax.random.key(2), (6, 300))
    x = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.7, x.shape), -jnp.inf, x)
    x = x.at[0].set(-jnp.inf).at[0, 299].set(2.5)  # one finite entry, in the tail tile
    x = x.at[1].set(-jnp.inf).at[1, 0].set(-7.0)  # one finite entry, in the first tile
    x = x.at[2].set(-jnp.inf)  # nothing: -inf, not nan
    got = np.asarray(row_logsumexp(x, backend="gpu_interpret", tiling=SMALL))
    np.testing.assert_allclose(got, reference.row_logsumexp(x), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got[:2], [2.5, -7.0], rtol=RTOL)
    assert got[2] == -np.inf


def test_large_offsets():
    x = 3e4 + 3.0 * jax.random.normal(jax.random.key(4), (5, 700))
    np.testing.assert_allclose(row_logsumexp(x, backend="gpu_interpret", tiling=SMALL),
                               reference.row_logsumexp(x), atol=0, rtol=RTOL)


def test_other_backends_run_the_oracle_and_bad_shapes_are_refused():
    x = jax.random.normal(jax.random.key(5), (4, 33))
    np.testing.assert_array_equal(row_logsumexp(x, backend="reference"),
                                  reference.row_logsumexp(x))
    with pytest.raises(ValueError, match=r"expects x \[N, V\]"):
        row_logsumexp(x[None], backend="gpu_interpret")


def test_gpu_kernel_lowers_to_triton():
    """The kernel lowers for CUDA to Triton IR on this CPU-only machine at the head's shape (one
    cross-entropy step, bf16); compiling the IR to PTX needs the device
    (``benchmarks/row_logsumexp.py``)."""
    x = jax.ShapeDtypeStruct((4096, 248320), jnp.bfloat16)
    text = jax.jit(lambda x: row_logsumexp(x, backend="gpu")).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "row_logsumexp" in text and "triton" in text.lower()
