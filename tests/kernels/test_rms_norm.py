"""The RMSNorm kernels (pallas_kernels.rms_norm) in interpret mode against their oracle, the jnp
norm differentiated by autodiff: the plain ``(1 + w)`` norm and the gated norm, values and the
gradients of x, weight and gate; tilings whose programs walk several tiles (the weight gradient
summed per program), rows that no tile size divides but 1; bf16; and the GPU path lowers to
Triton IR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import gpu, reference, rms_norm

# fp32: the kernel and the oracle compute the same expressions per element; the row means and
# the weight gradient's sum over rows are reduced in another order (per tile, then per program),
# so they differ by fp32 rounding of sums of at most a few hundred terms: 1e-6 relative to the
# largest entry (a tile dropped or counted twice moves the weight gradient by a whole tile's share).
RTOL = 1e-6
SMALL = gpu.Tiling(tile_elements=256, tiles_per_program=4)


def _inputs(shape, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    x = (3.0 * jax.random.normal(k[0], shape) + 0.5).astype(dtype)
    gate = jax.random.normal(k[1], shape).astype(dtype)
    weight = 0.2 * jax.random.normal(k[2], shape[-1:])
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, gate, weight, dy


def _value_and_grads(backend, x, gate, weight, dy, gated, unit_offset, tiling=SMALL):
    def loss(x, weight, gate):
        y = rms_norm(x, weight, gate=gate if gated else None, eps=1e-6, unit_offset=unit_offset,
                     backend=backend, tiling=tiling)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, gate)
    return y, grads


def _close(got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.max(np.abs(want)))


@pytest.mark.parametrize("shape", [(2, 24, 64), (3, 5, 2, 16), (7, 32)],
                         ids=["rows_48_tiles_of_4", "heads_rows_30", "rows_7_one_per_tile"])
@pytest.mark.parametrize("gated,unit_offset", [(False, True), (True, False)],
                         ids=["plain", "gated"])
def test_matches_the_oracle(shape, gated, unit_offset):
    x, gate, weight, dy = _inputs(shape)
    y, grads = _value_and_grads("gpu_interpret", x, gate, weight, dy, gated, unit_offset)
    y_ref, grads_ref = _value_and_grads("reference", x, gate, weight, dy, gated, unit_offset)
    assert y.shape == x.shape and y.dtype == x.dtype
    _close(y, y_ref)
    for got, want in zip(grads[:2] + (grads[2] if gated else None,),
                         grads_ref[:2] + (grads_ref[2] if gated else None,), strict=True):
        if want is not None:
            _close(got, want)
    if not gated:
        assert not np.any(grads[2])


def test_weight_gradient_sums_every_program():
    """48 rows in tiles of 4, 2 tiles per program: 6 programs' partial sums of the weight
    gradient; and one program holding all rows: the same gradient."""
    x, gate, weight, dy = _inputs((48, 64))
    for tiling in (gpu.Tiling(256, 2), gpu.Tiling(256, 16), gpu.Tiling(4096, 1)):
        _, grads = _value_and_grads("gpu_interpret", x, gate, weight, dy, True, False, tiling)
        _, grads_ref = _value_and_grads("reference", x, gate, weight, dy, True, False)
        _close(grads[1], grads_ref[1])


def test_bf16_rounds_like_the_oracle():
    """bf16 inputs: the same fp32 math and one rounding of the output; the gated form rounds the
    normed rows to bf16 before the gate, as the oracle. Within 1 bf16 ulp of the output's size
    (the oracle and the kernel may land on either side of a rounding boundary)."""
    x, gate, weight, dy = _inputs((4, 16, 128), jnp.bfloat16)
    for gated, unit_offset in ((False, True), (True, False)):
        y, grads = _value_and_grads("gpu_interpret", x, gate, weight, dy, gated, unit_offset)
        y_ref, grads_ref = _value_and_grads("reference", x, gate, weight, dy, gated, unit_offset)
        _close(y, y_ref, rtol=2.0**-7)
        _close(grads[0], grads_ref[0], rtol=2.0**-7)


def test_other_backends_run_the_oracle_and_bad_shapes_are_refused():
    x, gate, weight, _ = _inputs((4, 32))
    np.testing.assert_array_equal(rms_norm(x, weight, eps=1e-6, unit_offset=True, backend="reference"),
                                  reference.rms_norm(x, weight, eps=1e-6, unit_offset=True))
    with pytest.raises(ValueError, match=r"weight must be \[32\]"):
        rms_norm(x, weight[:16], eps=1e-6, unit_offset=True, backend="gpu_interpret")
    with pytest.raises(ValueError, match="gate must be shaped like x"):
        rms_norm(x, weight, gate=gate[:2], eps=1e-6, unit_offset=False, backend="gpu_interpret")


@pytest.mark.parametrize("shape,gated", [((4, 4096, 1024), False), ((4, 4096, 16, 128), True)],
                         ids=["hidden", "gated_heads"])
def test_gpu_kernels_lower_to_triton(shape, gated):
    """Forward and backward lower for CUDA to Triton IR on this CPU-only machine at the 0.8B
    train step's shapes (bf16); compiling the IR to PTX needs the device
    (``benchmarks/rms_norm.py``)."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    weight = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)

    def grads(x, weight):
        gate = x if gated else None
        return jax.grad(lambda x, w: jnp.sum(rms_norm(x, w, gate=gate, eps=1e-6, unit_offset=not gated,
                                                      backend="gpu").astype(jnp.float32)),
                        argnums=(0, 1))(x, weight)

    text = jax.jit(grads).trace(x, weight).lower(lowering_platforms=("cuda",)).as_text()
    assert "rms_norm_fwd" in text and "rms_norm_bwd" in text and "triton" in text.lower()
