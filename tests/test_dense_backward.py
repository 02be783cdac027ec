"""Dense projections keep the compute dtype in the backward pass: every matmul of the gradient
takes bf16 operands (fp32 accumulation), and the gradients equal plain autodiff of the
fp32-accumulated einsum, whose transposed matmuls take an fp32 cotangent next to a bf16 operand
(run by XLA as fp32 matmuls)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.model.layers import Dense


def test_dense_backward_matmuls_stay_in_bf16():
    layer = Dense(32, 16, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (4, 8, 32), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), (4, 8, 16))

    def ours(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * cotangent)

    def autodiff(params, x):
        kernel = params["kernel"][...].astype(jnp.bfloat16)
        y = jnp.einsum("...i,io->...o", x.astype(jnp.bfloat16), kernel,
                       preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    jaxpr = jax.make_jaxpr(jax.grad(ours, (0, 1)))(params, x)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward, d_x, d_kernel
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16] * 2
    reference = jax.make_jaxpr(jax.grad(autodiff, (0, 1)))(params, x)
    assert any(jnp.float32 in [v.aval.dtype for v in e.invars] for e in reference.eqns
               if e.primitive.name == "dot_general")  # what the custom backward avoids
    # Same products and fp32 sums (the bf16 cotangent is exact either way): equal up to the
    # order of summation, i.e. to one bf16 rounding of the result (2^-8 relative).
    got, want = jax.grad(ours, (0, 1))(params, x), jax.grad(autodiff, (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=2 ** -8 * np.abs(b).max())
