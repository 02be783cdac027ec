"""Pallas gated-delta scan kernels (GPU / TPU, interpret mode) against the jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gated_delta_reference import assert_gradient_cases_match

from pallas_kernels.gated_delta import api, reference

# fp32 in and out; kernel and reference reassociate the same short sums, so 1e-5 relative.
TOL = dict(rtol=1e-5, atol=1e-5)
# Gradients add one more level of reassociated sums (and the triangular-solve VJP end to end).
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def random_chunks(n=3, nt=3, chunk=16, dk=16, dv=32, seed=0):
    """Arbitrary chunk tensors and initial state (the scan is linear algebra on any values)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    shapes = [(n, nt, chunk, dk), (n, nt, chunk, chunk), (n, nt, chunk, dk), (n, nt, chunk, dv)]
    shapes.append((n, nt, chunk, dk))
    ct = [0.3 * jax.random.normal(kk, s) for kk, s in zip(ks, shapes, strict=False)]
    gam = jax.random.uniform(ks[5], (n, nt))
    s0 = jax.random.normal(ks[6], (n, dk, dv))
    return reference.ChunkTensors(*ct, gam), s0


@functools.partial(jax.jit, static_argnums=(0, 1))
def vjp_of(scan, need_states, ct, s0, cot):
    """Outputs and input cotangents of ``scan`` for output cotangents ``cot = (do, dh, ds)``;
    without ``need_states`` the states are not an output and ``dh`` is unused."""

    def f(c, s):
        o, h, s_final = scan(c, s, need_states)
        return (o, h, s_final) if need_states else (o, s_final)

    out, pullback = jax.vjp(f, ct, s0)
    return out, pullback(cot if need_states else (cot[0], cot[2]))


@pytest.mark.parametrize("backend", ["gpu_interpret", "tpu_interpret"])
def test_scan_kernels_forward_and_vjp(backend):
    ct, s0 = random_chunks()
    kernel_scan = api._scan_fn(backend)
    assert "pallas_call" in str(jax.make_jaxpr(kernel_scan, static_argnums=2)(ct, s0, False))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    n, nt, chunk, dk = ct.qg.shape
    dv = ct.u0.shape[-1]
    do = jax.random.normal(keys[0], (n, nt, chunk, dv))
    dh = jax.random.normal(keys[1], (n, nt, dk, dv))
    ds = jax.random.normal(keys[2], (n, dk, dv))
    for need_states in (False, True):
        out, grads = vjp_of(kernel_scan, need_states, ct, s0, (do, dh, ds))
        # The reference always returns the states; a zero state cotangent stands for "unused".
        dh_r = dh if need_states else jnp.zeros_like(dh)
        out_r, grads_r = vjp_of(reference.scan_chunks, True, ct, s0, (do, dh_r, ds))
        out_r = out_r if need_states else (out_r[0], out_r[2])
        for a, r in zip(out, out_r, strict=True):
            np.testing.assert_allclose(a, r, **TOL)
        for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
            np.testing.assert_allclose(a, r, **GRAD_TOL)


def test_end_to_end_gradients_match_reference():
    """Whole pipeline on the GPU kernels (packed documents, GQA, T not a multiple of the chunk,
    initial state): outputs, final state and gradients of q, k, v, g, beta and h0."""
    assert_gradient_cases_match("gpu_interpret", "reference")
