"""Dense projections keep the compute dtype in the backward pass: every matmul of the gradient
takes bf16 operands (fp32 accumulation), and the gradients equal plain autodiff of the
fp32-accumulated einsum, whose transposed matmuls take an fp32 cotangent next to a bf16 operand
(run by XLA as fp32 matmuls). The SwiGLU runs its gate and up projections as one such matmul."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.model.layers import Dense, SwiGLU


def _split_and_inputs(module: nnx.Module, width: int):
    graphdef, params = nnx.split(module)
    x = jax.random.normal(jax.random.key(1), (4, 8, 32), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), (4, 8, width))
    return graphdef, params, x, cotangent


def _bf16_dots(loss, params, x) -> int:
    """How many matmuls the loss and its gradient run; asserts each takes two bf16 operands."""
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, x)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16] * 2
    return len(dots)


def _assert_same_values_and_grads(loss, reference, params, x) -> None:
    # Same products and fp32 sums (the bf16 cotangent is exact either way): equal up to the
    # order of summation, i.e. to one bf16 rounding of the result (2^-8 relative).
    got = (loss(params, x), *jax.tree.leaves(jax.grad(loss, (0, 1))(params, x)))
    want = (reference(params, x), *jax.tree.leaves(jax.grad(reference, (0, 1))(params, x)))
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=2 ** -8 * np.abs(b).max())


def test_dense_backward_matmuls_stay_in_bf16():
    layer = Dense(32, 16, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params, x, cotangent = _split_and_inputs(layer, 16)

    def ours(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * cotangent)

    def autodiff(params, x):
        kernel = params["kernel"][...].astype(jnp.bfloat16)
        y = jnp.einsum("...i,io->...o", x.astype(jnp.bfloat16), kernel,
                       preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    assert _bf16_dots(ours, params, x) == 3  # forward, d_x, d_kernel
    reference = jax.make_jaxpr(jax.grad(autodiff, (0, 1)))(params, x)
    assert any(jnp.float32 in [v.aval.dtype for v in e.invars] for e in reference.eqns
               if e.primitive.name == "dot_general")  # what the custom backward avoids
    _assert_same_values_and_grads(ours, autodiff, params, x)


def test_swiglu_runs_gate_and_up_as_one_matmul():
    mlp = SwiGLU(32, 24, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params, x, cotangent = _split_and_inputs(mlp, 32)

    def ours(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * cotangent)

    def separate(params, x):  # gate and up as two projections
        m = nnx.merge(graphdef, params)
        y = m.down_proj(jax.nn.silu(m.gate_proj(x)) * m.up_proj(x))
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    # gate+up and down, each forward, d_x and d_kernel (separate projections: 9)
    assert _bf16_dots(ours, params, x) == 6
    assert _bf16_dots(separate, params, x) == 9
    _assert_same_values_and_grads(ours, separate, params, x)
