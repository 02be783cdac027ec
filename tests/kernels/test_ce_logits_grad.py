"""The cross-entropy logits-gradient kernel (pallas_kernels.ce_logits_grad) in interpret mode
against its oracle, the XLA expression: row and column tails (shifted last tiles), arrays
smaller than one tile, bf16 and fp32 logits and outputs, targets outside the array (a vocabulary
shard that does not hold them); bad shapes are refused and the GPU path lowers to Triton IR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ce_logits_grad import ce_logits_grad, gpu, reference

SMALL = gpu.Tiling(block_rows=4, block_cols=128)


def _inputs(shape, dtype, seed=0):
    rows, cols = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (4.0 * jax.random.normal(keys[0], shape) + 2.0).astype(dtype)
    lse = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
    targets = jax.random.randint(keys[1], (rows,), -3, cols + 3)  # some outside [0, V)
    weights = jax.random.uniform(keys[2], (rows,), minval=-1.0, maxval=2.0)
    return x, lse, targets, weights


@pytest.mark.parametrize("shape", [(8, 512), (9, 300), (3, 1000), (2, 50), (64, 129)],
                         ids=["whole_tiles", "both_tails", "few_rows", "below_one_tile",
                              "one_column_over"])
@pytest.mark.parametrize(("dtype", "out_dtype"), [(jnp.float32, jnp.float32),
                                                  (jnp.bfloat16, jnp.bfloat16),
                                                  (jnp.float32, jnp.bfloat16)])
def test_matches_the_oracle(shape, dtype, out_dtype):
    """Both compute in fp32 from the same stored logits and round once: the same exp of the same
    arguments, equal to fp32 rounding of exp (1e-6 relative before the rounding to out_dtype,
    so bf16 outputs may differ by one bf16 unit where the fp32 value lies at a rounding tie)."""
    args = _inputs(shape, dtype)
    got = ce_logits_grad(*args, out_dtype=out_dtype, backend="gpu_interpret", tiling=SMALL)
    want = reference.ce_logits_grad(*args, out_dtype)
    assert got.shape == shape and got.dtype == out_dtype
    ulp = 2.0 ** -7 if out_dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=ulp, atol=1e-7)


def test_rows_sum_to_weight_times_missing_target():
    """Softmax rows sum to one: each row of the gradient sums to ``w (1 - [target inside])``,
    which fails if a tile is skipped, counted twice with another value, or the onehot is misplaced
    (default tiling at a head-like width: two whole tiles and a shifted tail)."""
    x, lse, targets, weights = _inputs((5, 10000), jnp.float32, seed=1)
    targets = targets.at[0].set(9999).at[1].set(0).at[2].set(-1).at[3].set(10000).at[4].set(4100)
    got = ce_logits_grad(x, lse, targets, weights, out_dtype=jnp.float32,
                         backend="gpu_interpret")
    inside = (targets >= 0) & (targets < 10000)
    np.testing.assert_allclose(jnp.sum(got, axis=1), weights * (1.0 - inside), atol=2e-5)
    np.testing.assert_allclose(got[jnp.arange(5), jnp.clip(targets, 0, 9999)][inside],
                               (weights * (jnp.exp(x[jnp.arange(5), jnp.clip(targets, 0, 9999)]
                                                   - lse) - 1.0))[inside], rtol=1e-5)


def test_other_backends_run_the_oracle_and_bad_shapes_are_refused():
    args = _inputs((4, 33), jnp.float32)
    np.testing.assert_array_equal(ce_logits_grad(*args, out_dtype=jnp.float32,
                                                 backend="reference"),
                                  reference.ce_logits_grad(*args, jnp.float32))
    x, lse, targets, weights = args
    with pytest.raises(ValueError, match=r"expects logits \[N, V\]"):
        ce_logits_grad(x, lse[:3], targets, weights, out_dtype=jnp.float32)


def test_gpu_kernel_lowers_to_triton():
    """The kernel lowers for CUDA to Triton IR on this CPU-only machine at the head's shape (one
    cross-entropy step, bf16); compiling the IR to PTX needs the device
    (``benchmarks/ce_logits_grad.py``)."""
    rows, vocab = 4096, 248320
    shapes = (jax.ShapeDtypeStruct((rows, vocab), jnp.bfloat16),
              jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32),
              jax.ShapeDtypeStruct((rows,), jnp.float32))
    text = jax.jit(lambda *a: ce_logits_grad(*a, out_dtype=jnp.bfloat16, backend="gpu")).trace(
        *shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "ce_logits_grad" in text and "triton" in text.lower()
