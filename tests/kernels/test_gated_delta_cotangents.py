"""The GPU chunk-cotangent kernel (``gpu_cotangents``) against ``reference.chunk_cotangents``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import api, gpu, gpu_cotangents, reference

F32, BF16 = jnp.float32, jnp.bfloat16
# fp32 in, IEEE fp32 products on both sides (the kernel's dots at HIGHEST, the reference's
# einsums at HIGHEST): only the order of the fp32 sums differs (at most Dk * Dv = 4096 terms, in
# ``dgam``; sums over the value axis split into partial sums per block of columns), a few ulps of
# O(1)..O(60) values: 5e-5 absolute is about 6 ulps of 60.
TOL = dict(rtol=1e-5, atol=5e-5)
# bf16 outputs against the reference rounded to bf16: the same bf16 operands (``u`` rounded to bf16
# from the same fp32 value up to the order of its sums), so at most a bf16 ulp or two (2^-8
# relative) where the sums' order differs (equal in interpret mode on the CPU).
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def stream_inputs(key, n, nt, chunk, dk, dv, dtype):
    """One stream's operands (only ``w``, ``u0`` and ``gam``'s shape are read: the rest None)
    and its ``do`` (the compute dtype) and ``du`` (fp32, as the reverse scan writes it)."""
    ks = jax.random.split(key, 5)
    w = (0.3 * jax.random.normal(ks[0], (n, nt, chunk, dk))).astype(dtype)
    u0 = (0.3 * jax.random.normal(ks[1], (n, nt, chunk, dv))).astype(dtype)
    gam = jax.random.uniform(ks[2], (n, nt))
    ops = gpu.ScanOperands(None, None, None, w, u0, None, None, gam)
    do = jax.random.normal(ks[3], (n, nt, chunk, dv)).astype(dtype)
    return ops, do, jax.random.normal(ks[4], (n, nt, chunk, dv))


def states(key, n, nt, dk, dv):
    """``h`` and ``dh_next`` ``[N, NT, Dk, Dv]`` fp32."""
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (n, nt, dk, dv)), jax.random.normal(k2, (n, nt, dk, dv))


def expected(ops, h, do, du, dh_next, dtype) -> reference.ChunkTensors:
    """``reference.chunk_cotangents`` in the kernel's layout (flat), rounded to ``dtype``."""
    d = reference.chunk_cotangents(ops, h, do, du, dh_next)
    return reference.ChunkTensors(*(reference.flat_chunks(x).astype(dtype) for x in d[:5]), d.gam)


def assert_matches(d: reference.ChunkTensors, r: reference.ChunkTensors, dtype) -> None:
    tol = TOL if dtype == F32 else BF16_TOL
    for name, a, b in zip(reference.ChunkTensors._fields[:5], d, r, strict=False):
        assert a.dtype == dtype and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol, err_msg=name)
    assert d.gam.dtype == F32
    np.testing.assert_allclose(d.gam, r.gam, **TOL, err_msg="gam")  # fp32 from the fp32 states


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_dh", [True, False], ids=["dh_next", "no_dh_next"])
@pytest.mark.parametrize("noisy", [False, True], ids=["one_stream", "noisy"])
@pytest.mark.parametrize("n, chunk, d, block_v", [(2, 16, 32, 64), (4, 32, 64, 16)])
def test_kernel_matches_reference(n, chunk, d, block_v, noisy, has_dh, dtype):
    """Interpret mode, NT = 3: every cotangent of the stream (and of the noisy stream, which
    reads the same states and has no ``dh_next``: zero ``kd`` and ``gam``) in the chunk tensors'
    dtype, ``gam``'s in fp32; the state whole, and in four blocks of value columns."""
    nt = 3
    keys = jax.random.split(jax.random.PRNGKey(n * chunk + d), 3)
    ops, do, du = stream_inputs(keys[0], n, nt, chunk, d, d, dtype)
    side, do_n, du_n = stream_inputs(keys[1], n, nt, chunk, d, d, dtype)
    h, dh_next = states(keys[2], n, nt, d, d)
    dh_next = dh_next if has_dh else None
    kw = dict(noisy=side, do_noisy=do_n, du_noisy=du_n) if noisy else {}
    run = jax.jit(functools.partial(gpu_cotangents.chunk_cotangents, interpret=True,
                                    block_v=block_v, **kw))
    d_main, d_side = run(ops, h, do, du, dh_next)
    assert_matches(d_main, expected(ops, h, do, du, dh_next, dtype), dtype)
    if not noisy:
        assert d_side is None
        return
    assert_matches(d_side, expected(side, h, do_n, du_n, None, dtype), dtype)
    np.testing.assert_array_equal(np.asarray(d_side.kd, np.float32), 0.0)
    np.testing.assert_array_equal(d_side.gam, 0.0)


def test_wide_heads_keep_the_xla_path():
    """Head dims above ``MAX_HEAD_DIM`` (a [256, 64] fp32 state per program would not fit in
    registers) take ``reference.chunk_cotangents``: no kernel, the same outputs and layout."""
    n, nt, chunk, dk, dv = 2, 3, 16, 256, 64
    ops, do, du = stream_inputs(jax.random.PRNGKey(0), n, nt, chunk, dk, dv, F32)
    h, dh_next = states(jax.random.PRNGKey(1), n, nt, dk, dv)
    run = functools.partial(gpu_cotangents.chunk_cotangents, interpret=True)
    assert "pallas_call" not in str(jax.make_jaxpr(run)(ops, h, do, du, dh_next))
    d, _ = jax.jit(run)(ops, h, do, du, dh_next)
    assert_matches(d, expected(ops, h, do, du, dh_next, F32), F32)


def test_kernel_lowers_to_triton():
    """Both streams in one Triton kernel at the training shape (D 128, chunk 32, bf16)."""
    n, nt, chunk, d = 2, 4, 32, 128
    ops, do, du = stream_inputs(jax.random.PRNGKey(0), n, nt, chunk, d, d, BF16)
    h, dh_next = states(jax.random.PRNGKey(1), n, nt, d, d)

    def both(ops, h, do, du, dh_next):
        return gpu_cotangents.chunk_cotangents(ops, h, do, du, dh_next, noisy=ops, do_noisy=do, du_noisy=du)

    text = jax.jit(both).trace(ops, h, do, du, dh_next).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "gated_delta_chunk_cotangents" in text


def test_handoff_backward_runs_one_cotangent_kernel():
    """The fused handoff's backward (block 32, D 128, bf16) computes both streams' chunk
    cotangents in one kernel: per stream kkt, solve, wy and the preparation backward; one scan
    each way; one cotangent kernel (no XLA matmuls left in between)."""
    b, t, h, d = 1, 64, 2, 128
    q, v = jnp.ones((b, t, h, d), BF16), jnp.ones((b, t, h, d), BF16)
    stream = api.GatedDeltaInputs(q, q, v, -jnp.ones((b, t, h)), jnp.ones((b, t, h), BF16))

    def loss(clean, noisy):
        o_c, o_n, s = api.gated_delta_rule_handoff(
            clean, noisy, block_size=32, segment_ids=jnp.zeros((b, t), int), backend="gpu"
        )
        return jnp.sum(o_c.astype(F32)) + jnp.sum(o_n.astype(F32)) + jnp.sum(s)

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(stream, stream)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2 * 4 + 3
    assert "gated_delta_chunk_cotangents" in text
    assert "stablehlo.dot_general" not in text  # the chunk matmuls all run in the kernels
