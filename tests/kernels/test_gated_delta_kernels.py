"""Pallas gated-delta scan kernels (GPU / TPU, interpret mode) against the jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gated_delta_reference import assert_gradient_cases_match, make_inputs, packed_segments

from pallas_kernels.gated_delta import api, gpu, gpu_pass, reference

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


def random_operands(b=2, hk=1, hv=2, nt=3, chunk=16, dk=16, dv=32, seed=0):
    """Arbitrary GPU scan operands: q, k in the public layout with two value heads per key
    head, random row scales."""
    ct, s0 = random_chunks(n=b * hv, nt=nt, chunk=chunk, dk=dk, dv=dv, seed=seed)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
    q, k = (0.3 * jax.random.normal(kk, (b, nt * chunk, hk, dk)) for kk in keys[:2])
    q_scale, k_scale = (jax.random.uniform(kk, (b * hv, nt * chunk)) for kk in keys[2:])
    return gpu.ScanOperands(q, q_scale, ct.p, ct.w, ct.u0, k, k_scale, ct.gam), s0


def materialized(ops: gpu.ScanOperands) -> reference.ChunkTensors:
    """The chunk tensors the operands stand for (``qg = diag(q_scale) q``, ``kd`` likewise)."""
    n, nt, chunk, dk = ops.w.shape

    def scaled(x, scale):  # public [B, T, Hk, Dk] -> value-head rows [N, NT, L, Dk]
        rows = jnp.moveaxis(reference.expand_heads(x, n // x.shape[0]), 2, 1).reshape(n, -1, dk)
        return (scale[..., None] * rows).reshape(n, nt, chunk, dk)

    return reference.ChunkTensors(scaled(ops.q, ops.q_scale), ops.p, ops.w, ops.u0,
                                  scaled(ops.k, ops.k_scale), ops.gam)


@functools.partial(jax.jit, static_argnums=(0, 1))
def vjp_of(scan, need_states, ct, s0, cot):
    """Outputs and input cotangents of ``scan`` for output cotangents ``cot = (do, dh, ds)``;
    without ``need_states`` the states are not an output and ``dh`` is unused."""

    def f(c, s):
        o, h, s_final = scan(c, s, need_states)
        return (o, h, s_final) if need_states else (o, s_final)

    out, pullback = jax.vjp(f, ct, s0)
    return out, pullback(cot if need_states else (cot[0], cot[2]))


def scan_cotangents(shape_of, seed=1):
    """Random ``(do, dh, ds)`` for a scan over operands shaped like ``shape_of``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    n, nt, chunk, dk = shape_of.w.shape
    dv = shape_of.u0.shape[-1]
    return (jax.random.normal(keys[0], (n, nt, chunk, dv)), jax.random.normal(keys[1], (n, nt, dk, dv)),
            jax.random.normal(keys[2], (n, dk, dv)))


def test_tpu_scan_kernels_forward_and_vjp():
    """The TPU scan and its custom VJP against autodiff of the reference scan."""
    ct, s0 = random_chunks()
    kernel_scan = api._scan_fn("tpu_interpret")
    assert "pallas_call" in str(jax.make_jaxpr(kernel_scan, static_argnums=2)(ct, s0, False))
    do, dh, ds = scan_cotangents(ct)
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


def test_gpu_scan_kernels_forward_and_reverse():
    """GPU scan kernels on operands with q, k in the public layout (GQA) and row scales: the
    outputs and states, and the reverse scan with the XLA matmuls of the VJP
    (``reference.chunk_cotangents``), against the reference scan of the chunk tensors they
    stand for and its autodiff (cotangents of qg, p, w, u0, kd, gam and of the initial state)."""
    ops, s0 = random_operands()
    do, dh, ds = scan_cotangents(ops)

    @jax.jit
    def kernels(ops, s0):
        o, h, s_final, _ = gpu.scan_fwd(ops, s0, write_states=True, interpret=True)
        du, dh_next, ds0, _ = gpu.scan_bwd(ops, do, ds, dh, interpret=True)
        return (o, h, s_final), (reference.chunk_cotangents(ops, h, do, du, dh_next), ds0)

    out, grads = kernels(ops, s0)
    out_r, grads_r = vjp_of(reference.scan_chunks, True, materialized(ops), s0, (do, dh, ds))
    for a, r in zip(out, out_r, strict=True):
        np.testing.assert_allclose(a, r, **TOL)
    for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(a, r, **GRAD_TOL)


def test_end_to_end_gradients_match_reference():
    """Whole pipeline on the GPU kernels (packed documents, GQA, T not a multiple of the chunk,
    initial state): outputs, final state and gradients of q, k, v, g, beta and h0."""
    assert_gradient_cases_match("gpu_interpret", "reference")


def test_gpu_preparation_and_its_backward_match_reference():
    """GPU preparation kernels (interpret mode) vs ``reference.chunk_tensors`` and its autodiff
    VJP (public layout, GQA with 2 value heads per key head): chunk 48 = three 16-row blocks
    (diagonal inverses, one- and two-term block substitutions), several documents per chunk, a
    row whose first token resets. The kernels' operands are compared as the chunk tensors they
    stand for; the backward kernel takes the cotangents of all of them (``qg`` and ``kd``
    included) and returns those of q, k, v, beta and the decay cumsum."""
    b, t, hk, hv, dk, dv, chunk, scale = 2, 96, 1, 2, 16, 32, 48, 0.7
    (q, k, v, g, beta), _ = make_inputs(3, b=b, t=t, hk=hk, hv=hv, dk=dk, dv=dv)
    reset = (jax.random.uniform(jax.random.PRNGKey(5), (b, t)) < 0.06).at[1, 0].set(True)
    stream = api._gpu_prepare(q, k, v, g, beta, reset, chunk, scale, jnp.float32)
    nt, n = t // chunk, b * hv

    def chunk_tensors(q, k, v, beta, gcum):
        def split(x):  # [B, T, H, ...] -> [B, Hv, NT, L, ...]
            x = jnp.moveaxis(reference.expand_heads(x, hv), 2, 1)
            return x.reshape(b, hv, nt, chunk, *x.shape[3:])

        rel = stream.rel.reshape(b, 1, nt, chunk)
        outs = reference.chunk_tensors(split(q), split(k), split(v), split(beta),
                                       gcum.reshape(b, hv, nt, chunk), rel, scale)
        return [x.reshape(n, nt, chunk, -1) for x in outs]

    inputs = (stream.q, stream.k, stream.v, stream.beta, stream.gcum)
    outs_r, pullback = jax.vjp(chunk_tensors, *inputs)
    cots = reference.ChunkTensors(
        *(jax.random.normal(jax.random.PRNGKey(i), o.shape) for i, o in enumerate(outs_r)),
        jax.random.normal(jax.random.PRNGKey(7), stream.gam.shape))
    grads_r = pullback(list(cots[:5]))

    @jax.jit
    def kernels(stream, cots):
        ops, t_inv = gpu_pass._prepare(stream, True)
        kept = gpu_pass._kernel_outputs(ops, t_inv)
        return materialized(ops), gpu_pass._stream_cotangent(stream, kept, cots, True)

    outs, grads = kernels(stream, cots)
    for name, a, r in zip(reference.ChunkTensors._fields, outs, outs_r, strict=False):
        np.testing.assert_allclose(a, r, **TOL, err_msg=name)
    # The kernel VJP is derived by hand (dA = -T^T dT T^T etc.): GRAD_TOL on O(1)..O(20) values.
    for name, a, r in zip(("q", "k", "v", "beta", "gcum"), [grads.q, grads.k, grads.v, grads.beta,
                                                            grads.gcum], grads_r, strict=True):
        np.testing.assert_allclose(a, r, **GRAD_TOL, err_msg=name)
    np.testing.assert_array_equal(grads.gam, cots.gam)  # the carry decays pass straight through


@pytest.mark.parametrize("dk, dv", [(128, 128), (256, 64), (64, 256)])
def test_gpu_kernels_lower_to_triton(dk, dv):
    """The GPU path lowers for CUDA on this CPU-only machine (Pallas -> Triton IR for every kernel:
    the three preparation kernels, the scan forward and backward, the chunk cotangents (head
    dims up to 128; XLA above), the preparation backward) at chunk 64, bf16, for the head dims
    the issue names (the benchmark's D 128; 256 for keys and for values). Triton's own
    compilation to PTX needs the device (``benchmarks/gated_delta.py --check``)."""
    b, t, hk, hv = 1, 128, 1, 2
    bf16 = jnp.bfloat16
    q = jnp.ones((b, t, hk, dk), bf16)
    v = jnp.ones((b, t, hv, dv), bf16)
    g, beta = -jnp.ones((b, t, hv)), jnp.ones((b, t, hv), bf16)

    def loss(q, k, v, g, beta):
        o, s = api.gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.zeros((b, t), int), backend="gpu")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    lowered = jax.jit(jax.grad(loss, argnums=range(5))).trace(q, q, v, g, beta)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    names = (
        "gated_delta_prepare_kkt",
        "gated_delta_prepare_solve",
        "gated_delta_prepare_wy",
        "gated_delta_scan_fwd",
        "gated_delta_scan_bwd",
        "gated_delta_prepare_bwd",
    ) + (("gated_delta_chunk_cotangents",) if max(dk, dv) <= 128 else ())
    assert text.count("__gpu$xla.gpu.triton") == len(names)
    for name in names:
        assert name in text, name


def test_scan_value_block_keeps_one_program_per_sm():
    """64 state columns per program while that leaves at least one program per SM (faster on
    the H100 than narrower blocks, see ``gpu._block_v``), narrower down to 16 for few heads;
    an explicit ``Tiling.block_v`` is capped at D_v."""
    assert gpu._block_v(128, 128) == 64  # 8 x 16 heads: 256 programs
    assert gpu._block_v(48, 128) == 32  # 192 programs
    assert gpu._block_v(16, 128) == 16  # 128 programs: the narrowest block
    assert gpu.Tiling(block_v=128).width(1, 64) == 64
    assert gpu.Tiling().width(128, 128) == 64


@functools.cache
def handoff_case(backend: str, block_size: int, chunk_size: int, dtype=jnp.float32, heads=(2, 4)):
    """Outputs of both streams, final state and the gradients wrt both streams' (q, k, v, g,
    beta) and h0 of a handoff over T = 45 (three blocks of 16, the last one padded), GQA
    (``heads`` = (Hk, Hv)), an initial state, documents starting inside blocks and one exactly at
    a block start (row 1, token 32); q, k, v in ``dtype``. Cached: the reference oracle is
    shared by the kernel cases."""
    b, t = 2, 45

    def inputs(seed):
        (q, k, v, *gates), s0 = make_inputs(seed, b=b, t=t, hk=heads[0], hv=heads[1])
        return (q.astype(dtype), k.astype(dtype), v.astype(dtype), *gates), s0

    clean, s0 = inputs(6)
    noisy, _ = inputs(7)
    seg = packed_segments(b, t, seed=8, max_docs=4).at[1, 32:].set(9)
    handoff = functools.partial(
        api.gated_delta_rule_handoff,
        block_size=block_size,
        chunk_size=chunk_size,
        segment_ids=seg,
        backend=backend,
    )

    def loss(c, n, s0):
        o_c, o_n, s = handoff(api.GatedDeltaInputs(*c), api.GatedDeltaInputs(*n), initial_state=s0)
        # Different nonlinear weights per stream: a swapped or misplaced output changes the loss.
        return jnp.sum(o_c * jnp.cos(o_c)) + jnp.sum(o_n * jnp.sin(o_n + 1)) + jnp.sum(s * s), (o_c, o_n, s)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(clean, noisy, s0)
    forward = jax.make_jaxpr(handoff)(api.GatedDeltaInputs(*clean), api.GatedDeltaInputs(*noisy))
    return outs, grads, str(forward).count("name=gated_delta_scan_fwd")


@pytest.mark.parametrize(
    "backend, block_size, chunk_size, scans",
    [
        ("gpu_interpret", 16, 32, 1),  # one chunk per block: both streams in one scan
        ("tpu_interpret", 16, 32, 1),
        ("gpu_interpret", 16, 8, 2),  # two chunks per block: clean states, then the noisy scan
    ],
)
def test_handoff_kernels_match_reference(backend, block_size, chunk_size, scans):
    """Kernel handoff vs the reference handoff (fp32): both outputs and the final state to TOL,
    every gradient to GRAD_TOL; with one chunk per block the forward launches one scan kernel
    (no block states are written between two scans)."""
    outs, grads, num_scans = handoff_case(backend, block_size, chunk_size)
    outs_r, grads_r, _ = handoff_case("reference", block_size, 64)
    assert num_scans == scans
    for name, a, r in zip(("o_clean", "o_noisy", "final_state"), outs, outs_r, strict=True):
        np.testing.assert_allclose(a, r, **TOL, err_msg=name)
    names = [f"{s}.{x}" for s in ("clean", "noisy") for x in ("q", "k", "v", "g", "beta")] + ["h0"]
    for name, a, r in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(a, r, **GRAD_TOL, err_msg=name)


@pytest.mark.parametrize("heads", [(2, 4), (4, 4)])
def test_bf16_handoff_stays_near_fp32(heads):
    """bf16 q, k, v through the fused GPU handoff, whose backward stores the chunk states, the
    reverse scan's cotangents and (without GQA) dq, dk, dv in bf16, against the reference (fp32
    math on the same bf16 inputs, bf16 outputs): every output and gradient within 1e-2 relative
    L2 error. Measured at most 5.0e-3, the same to 1e-8 as with those stores in fp32: the error
    is the bf16 rounding (2^-9) of the operands that every product reads."""
    outs, grads, _ = handoff_case("gpu_interpret", 16, 32, jnp.bfloat16, heads)
    outs_r, grads_r, _ = handoff_case("reference", 16, 64, jnp.bfloat16, heads)
    names = ["o_clean", "o_noisy", "final_state"]
    names += [f"d{s}.{x}" for s in ("clean", "noisy") for x in ("q", "k", "v", "g", "beta")] + ["dh0"]
    leaves = zip(names, [*outs, *jax.tree.leaves(grads)], [*outs_r, *jax.tree.leaves(grads_r)], strict=True)
    for name, a, r in leaves:
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.linalg.norm(a - r) <= 1e-2 * np.linalg.norm(r), name


def test_fused_handoff_lowers_to_triton():
    """The handoff with one chunk per block (block 32, the training default) lowers for CUDA:
    the preparation kernels once per stream, one scan forward and one scan backward that carry
    the noisy stream (bf16, D 128, chunk 32)."""
    b, t, h, d = 1, 64, 2, 128
    bf16 = jnp.bfloat16
    q, v = jnp.ones((b, t, h, d), bf16), jnp.ones((b, t, h, d), bf16)
    stream = api.GatedDeltaInputs(q, q, v, -jnp.ones((b, t, h)), jnp.ones((b, t, h), bf16))

    def loss(clean, noisy):
        o_c, o_n, s = api.gated_delta_rule_handoff(
            clean, noisy, block_size=32, segment_ids=jnp.zeros((b, t), int), backend="gpu"
        )
        return jnp.sum(o_c.astype(jnp.float32)) + jnp.sum(o_n.astype(jnp.float32)) + jnp.sum(s)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(stream, stream).lower(lowering_platforms=("cuda",))
    text = text.as_text()
    # Per stream: kkt, solve, wy and the preparation backward; plus one scan each way and the
    # chunk cotangents of both streams.
    assert text.count("__gpu$xla.gpu.triton") == 2 * 4 + 3
    for name in ("gated_delta_scan_fwd", "gated_delta_scan_bwd", "gated_delta_chunk_cotangents"):
        assert name in text, name


def test_scan_stages_fit_shared_memory():
    """Two pipeline stages of a plain scan's chunk tiles fit (64 KiB at chunk 64, D 128, bf16);
    the handoff scan's (112 KiB, two streams) drop to one stage (two failed on the H200). With
    more programs than SMs the forward takes one stage (several programs per SM); an explicit
    stage count holds where it fits."""
    plain = gpu._tile_bytes(64, [128, 64, 128, 64, 128], 2)
    handoff = plain + gpu._tile_bytes(64, [128, 64, 128, 64], 2)
    assert gpu.Tiling().params(plain, 128).num_stages == 2
    assert gpu.Tiling().params(handoff, 128).num_stages == 1
    assert gpu.Tiling().params(plain, 256).num_stages == 1
    assert gpu.Tiling(num_stages=2).params(plain, 256).num_stages == 2
    assert gpu.Tiling(num_stages=2).params(handoff, 64).num_stages == 1
