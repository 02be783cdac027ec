"""Grouped matmul kernels (interpret mode) against ``jax.lax.ragged_dot``: values and gradients,
groups of every size incl. empty ones, tiles straddling group boundaries, rows not a multiple of
the tile, transposed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import gpu
from pallas_kernels.grouped_matmul.api import grouped_matmul

# fp32 operands, 'highest' precision on both sides: only the summation order differs.
TOL = dict(rtol=1e-5, atol=1e-5)


def case(sizes, contract=32, out=48, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    rows = int(sum(sizes))
    x = jax.random.normal(keys[0], (rows, contract))
    w = jax.random.normal(keys[1], (len(sizes), contract, out))
    dy = jax.random.normal(keys[2], (rows, out))
    return x, w, jnp.asarray(sizes, jnp.int32), dy


SIZES = [
    [70, 0, 3, 64, 1, 0, 50],  # empty groups, one-row groups, boundaries inside tiles
    [0, 0, 5],                 # everything in the last group, fewer rows than one tile
    [128, 64],                 # boundaries on tile edges
]


@pytest.mark.parametrize("sizes", SIZES)
def test_values_and_gradients_match_ragged_dot(sizes):
    x, w, group_sizes, dy = case(sizes)

    def loss(backend, x, w):
        out = grouped_matmul(x, w, group_sizes, precision=jax.lax.Precision.HIGHEST,
                             backend=backend)
        return jnp.sum(out * dy), out

    with jax.default_matmul_precision("highest"):
        (_, ours), grads = jax.value_and_grad(loss, (1, 2), has_aux=True)(
            "gpu_interpret", x, w)
        (_, ref), ref_grads = jax.value_and_grad(loss, (1, 2), has_aux=True)("reference", x, w)
    np.testing.assert_allclose(ours, ref, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_transposed_weights_and_work_items():
    sizes = [70, 0, 3, 64, 1, 0, 50]
    x, w, group_sizes, _ = case(sizes, contract=32, out=32, seed=1)
    with jax.default_matmul_precision("highest"):
        got = gpu.grouped_matmul(x, jnp.swapaxes(w, 1, 2), group_sizes, transpose_w=True,
                                 interpret=True)
        want = jax.lax.ragged_dot(x, w, group_sizes)
    np.testing.assert_allclose(got, want, **TOL)
    items = gpu.work_items(group_sizes, num_tiles=4, block_m=64)
    count = int(items.count[0])
    # rows 0-69 -> tiles 0,1 (group 0); 70-72 -> tile 1; 73-136 -> tiles 1,2; 137 -> tile 2;
    # 138-187 -> tiles 2 (group 6).
    pairs = zip(items.group[:count].tolist(), items.tile[:count].tolist(), strict=True)
    assert list(pairs) == [
        (0, 0), (0, 1), (2, 1), (3, 1), (3, 2), (4, 2), (6, 2)]


def test_gpu_kernels_lower_to_triton():
    """Forward and both backward kernels lower for CUDA to Triton IR on this CPU-only machine at
    the MoE benchmark's tile sizes (bf16, contraction 2048, 512 columns); compiling the IR to PTX
    needs the device (``benchmarks/grouped_matmul.py``)."""
    x = jnp.ones((300, 2048), jnp.bfloat16)
    w = jnp.ones((8, 2048, 512), jnp.bfloat16)
    sizes = jnp.asarray([100, 0, 50, 50, 0, 0, 60, 40], jnp.int32)

    def loss(x, w):
        return jnp.sum(grouped_matmul(x, w, sizes, backend="gpu"))

    text = jax.jit(jax.grad(loss, (0, 1))).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert text.count("grouped_matmul") >= 2 and "grouped_outer" in text


def test_gpu_kernels_reject_expert_sides_off_the_tile():
    x, w, group_sizes, _ = case([8, 8], contract=24)
    with pytest.raises(ValueError, match="expert matrix sides must be a multiple of 16, got 24"):
        gpu.grouped_matmul(x, w, group_sizes)
