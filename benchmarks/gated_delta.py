"""Gated delta rule on one GPU: our Pallas path vs the XLA jnp reference and fla, in one run.

Prints a correctness check of the compiled kernels against the reference (fp32; plain and the
handoff at one and at two chunks per block), then forward and forward+backward times (bf16 inputs)
with ratios, and the handoff-mode cost against a plain causal forward over the same number of
tokens (right after the first shape). ``--json PATH`` writes the numbers after every section;
sections that would start after ``--budget-s`` seconds are skipped. ``--check``: only the full
correctness check (all head layouts). ``--stages``: per-kernel times and
launch-parameter variants at the first shape (profile). ``--no-peers``: our kernels only.
``--extra-chunks 32``: also our kernels at chunk 32 at every shape. ``--kernels``: device time
per kernel of our forward and forward+backward (``jax.profiler``) and of fla's forward
(``torch.profiler``) at the first shape, each kernel in its place in the whole pass.
CPU smoke: ``--backend gpu_interpret --shapes 1x128x2x32 --handoff 1x64x2x32 --stages``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import api, gpu, gpu_cotangents, gpu_pass, gpu_prep, reference

F32 = jnp.float32

SHAPES = "8x4096x16x128,1x32768x16x128,4x16384x32x128"
HANDOFF = "8x4096x16x128"  # clean tokens per row; the noisy copy doubles them


def make_inputs(key, b, t, hk, hv, dk, dv, dtype):
    """l2-normalised q/k, g <= 0, beta in (0, 1), an initial state."""
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, hk, dk))
    k = jax.random.normal(ks[1], (b, t, hk, dk))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, hv, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, hv)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, hv)))
    s0 = jax.random.normal(ks[5], (b, hv, dk, dv)) * 0.1
    return [x.astype(dtype) for x in (q, k, v)] + [g, beta.astype(dtype)], s0


def timeit(fn: Callable, *args, iters: int = 10, repeats: int = 5) -> float:
    """Milliseconds per call of ``iters`` calls issued back to back (one wait at the end, as
    fla's CUDA-event timing of back-to-back calls), median over ``repeats``, after a compile +
    warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return 1e3 * float(np.median(times))


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


HANDOFF_CHECK_BLOCKS = (32, 128)  # one chunk per block (fused scan); two chunks per block


def check_case(backend: str, hk: int, hv: int, dk: int, dv: int) -> dict:
    """One fp32 case: outputs, final state and gradients vs the reference, the same for the
    handoff (both outputs, the final state, the largest gradient error over both streams and
    h0) at ``HANDOFF_CHECK_BLOCKS``; then bf16 inputs (the fast path: bf16 chunk tensors, the
    inverse's TF32 products) against the fp32 reference: the output and the largest gradient
    error."""
    b, t = 2, 300
    (q, k, v, g, beta), s0 = make_inputs(jax.random.PRNGKey(dk), b, t, hk, hv, dk, dv, F32)
    noisy, _ = make_inputs(jax.random.PRNGKey(7), b, t, hk, hv, dk, dv, F32)
    seg = np.cumsum(np.random.default_rng(0).random((b, t)) < 0.01, axis=1)
    seg = jnp.asarray(seg, jnp.int32)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape)

    def loss(q, k, v, g, beta, s0, backend):
        o, s = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, backend=backend)
        return jnp.sum(o * dy) + jnp.sum(s * s), (o, s)

    def handoff_loss(clean, noisy, s0, block_size, backend):
        outs = api.gated_delta_rule_handoff(
            api.GatedDeltaInputs(*clean),
            api.GatedDeltaInputs(*noisy),
            block_size=block_size,
            segment_ids=seg,
            initial_state=s0,
            backend=backend,
        )
        oc, on, s = outs
        return jnp.sum(oc * dy) + jnp.sum(on * jnp.flip(dy, 1)) + jnp.sum(s * s), outs

    grad = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True), static_argnames="backend")
    (gk, (ok, sk)), (gr, (o_r, s_r)) = (
        grad(q, k, v, g, beta, s0, backend=be) for be in (backend, "reference")
    )
    errs = {"o": max_rel(ok, o_r), "state": max_rel(sk, s_r)}
    errs |= {n: max_rel(x, y) for n, x, y in zip(GRAD_NAMES, gk, gr, strict=True)}
    name = f"hk{hk}_hv{hv}_dk{dk}_dv{dv}"
    print_errs(f"{name} plain", errs)  # a call cut short keeps this line
    hgrad = jax.jit(
        jax.grad(handoff_loss, argnums=(0, 1, 2), has_aux=True), static_argnames=("block_size", "backend")
    )
    for bs in HANDOFF_CHECK_BLOCKS:
        (gh, oh), (gh_r, oh_r) = (
            hgrad((q, k, v, g, beta), noisy, s0, block_size=bs, backend=be) for be in (backend, "reference")
        )
        names = (f"handoff{bs}_{n}" for n in ("o_clean", "o_noisy", "state"))
        herrs = {n: max_rel(x, y) for n, x, y in zip(names, oh, oh_r, strict=True)}
        pairs = zip(jax.tree.leaves(gh), jax.tree.leaves(gh_r), strict=True)
        herrs[f"handoff{bs}_grads"] = max(max_rel(x, y) for x, y in pairs)
        print_errs(f"{name} handoff block {bs}", herrs)
        errs |= herrs
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)] + [g, beta]
    g_bf16, (o_bf16, _) = grad(*bf16, s0, backend=backend)
    berrs = {
        "o_bf16_vs_fp32_ref": max_rel(o_bf16, o_r),
        "grads_bf16_vs_fp32_ref": max(max_rel(x, y) for x, y in zip(g_bf16, gr, strict=True)),
    }
    print_errs(f"{name} bf16", berrs)
    return errs | berrs


def print_errs(name: str, errs: dict) -> None:
    print(f"  {name}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)


CHECK_LAYOUTS = ((2, 4, 128, 128), (1, 2, 64, 256))  # (Hk, Hv, Dk, Dv)


def check(backend: str, layouts: tuple[tuple[int, ...], ...]) -> dict:
    """Compiled kernel vs reference at these (Hk, Hv, Dk, Dv) head layouts (Triton and XLA
    compiles are the cost of this section)."""
    return {
        f"hk{hk}_hv{hv}_dk{dk}_dv{dv}": check_case(backend, hk, hv, dk, dv)
        for hk, hv, dk, dv in layouts
    }


def fla_runner(q, k, v, g, beta) -> Callable[[], object] | None:
    """fla ``chunk_gated_delta_rule`` forward on the same inputs, as a no-argument call (bf16
    q/k/v/beta, fp32 g, on the GPU); None if fla is missing."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    tt = [torch.from_numpy(np.array(x.astype(jnp.float32))).cuda() for x in (q, k, v, g, beta)]
    tq, tk, tv, tbeta = (x.to(torch.bfloat16) for x in (tt[0], tt[1], tt[2], tt[4]))
    return lambda: chunk_gated_delta_rule(tq, tk, tv, tt[3], tbeta, output_final_state=True)


def fla_forward_ms(q, k, v, g, beta) -> float | None:
    """fla forward, ms per call of 10 back-to-back calls (None if fla is missing)."""
    run = fla_runner(q, k, v, g, beta)
    if run is None:
        return None
    import torch

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def fla_kernels_ms(q, k, v, g, beta, calls: int = 5) -> dict[str, float] | None:
    """fla forward's device time per CUDA kernel name (ms per call; None if fla is missing)."""
    run = fla_runner(q, k, v, g, beta)
    if run is None:
        return None
    import torch

    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 / calls for e in prof.key_averages() if e.device_time_total > 0}


def forward_fn(backend: str, **kw) -> Callable:
    """Jitted ``gated_delta_rule(q, k, v, g, beta)`` (``kw``: e.g. ``chunk_size``)."""
    return jax.jit(lambda *a: api.gated_delta_rule(*a, backend=backend, **kw))


def fwd_bwd_fn(backend: str, dy: jax.Array | None = None, **kw) -> Callable:
    """Jitted gradients of q, k, v, g, beta of ``sum(o * dy) + sum(final state)`` (``dy``
    None: ones)."""

    def loss(*a):
        o, s = api.gated_delta_rule(*a, backend=backend, **kw)
        o = o.astype(F32)
        return jnp.sum(o if dy is None else o * dy) + jnp.sum(s)

    return jax.jit(jax.grad(loss, argnums=range(5)))


def bench_kernels(b, t, h, d, backend) -> dict:
    """Per-kernel device time (ms per call) of our forward and forward+backward and of fla's
    forward at one shape, from traces of the whole pass."""
    from trace_summary import profile_top

    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, t, h, h, d, d, jnp.bfloat16)
    r = {}
    for name, fn in (("ours_fwd", forward_fn(backend)), ("ours_fwd_bwd", fwd_bwd_fn(backend))):
        top = profile_top(lambda fn=fn: fn(q, k, v, g, beta), calls=5, trace_dir=f"/tmp/gd_{name}", top=40)
        r[name] = {e["name"]: e["ms_per_call"] for e in top}
    r["fla_fwd"] = fla_kernels_ms(q, k, v, g, beta)
    for name, kernels in r.items():
        if kernels:
            total = sum(kernels.values())
            rows = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(kernels.items(), key=lambda x: -x[1]))
            print(f"  kernels {name} (sum {total:.3f} ms): {rows}", flush=True)
    return r


def bench_shape(b, t, h, d, backend, peers: bool, extra_chunks: tuple[int, ...] = ()) -> dict:
    """Ours (default chunk, then each of ``extra_chunks``) and the peers at one shape."""
    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, t, h, h, d, d, jnp.bfloat16)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.bfloat16)
    fwd = forward_fn
    fwd_bwd = functools.partial(fwd_bwd_fn, dy=dy)
    args = (q, k, v, g, beta)
    r = {"ours_fwd": timeit(fwd(backend), *args), "ours_fwd_bwd": timeit(fwd_bwd(backend), *args)}
    for c in extra_chunks:
        r[f"ours_fwd_chunk{c}"] = timeit(fwd(backend, chunk_size=c), *args)
        r[f"ours_fwd_bwd_chunk{c}"] = timeit(fwd_bwd(backend, chunk_size=c), *args)
    if not peers:
        return r
    r |= {
        "xla_fwd": timeit(fwd("reference"), *args, iters=3),
        "xla_fwd_bwd": timeit(fwd_bwd("reference"), *args, iters=3),
        "fla_fwd": fla_forward_ms(*args),
    }
    r["fwd_vs_fla"] = r["ours_fwd"] / r["fla_fwd"] if r["fla_fwd"] else None
    r["fwd_bwd_speedup_vs_xla"] = r["xla_fwd_bwd"] / r["ours_fwd_bwd"]
    r["fwd_speedup_vs_xla"] = r["xla_fwd"] / r["ours_fwd"]
    return r


class _Printed(dict):
    """A dict that prints every entry as it is set (a profile cut short keeps its lines)."""

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"  stage {key}: {value:.3f} ms", flush=True)


def bench_stages(b, t, h, d, backend, chunk: int = 64) -> dict:
    """Profile of the GPU path at one shape and chunk: each kernel timed alone (then launch
    variants), the XLA glue as the difference of the preparation with and without it, the chunk
    cotangents' kernel next to their XLA form, the whole pass at chunk 32."""
    interpret = backend.endswith("_interpret")
    scale, bf16 = d**-0.5, jnp.bfloat16
    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, t, h, h, d, d, bf16)
    reset = jnp.zeros((b, t), bool)
    stream = api._gpu_prepare(q, k, v, g, beta, reset, chunk, scale, bf16)  # noqa: SLF001
    prep_in = (stream.q, stream.k, stream.v, stream.beta, stream.gcum, stream.rel)
    kw = dict(chunk=chunk, interpret=interpret)
    prepare = jax.jit(  # the XLA glue, the kernels and the row scales of the scan's operands
        lambda *a: gpu_pass._prepare(api._gpu_prepare(*a, reset, chunk, scale, bf16), interpret)[0]  # noqa: SLF001
    )
    ct = prepare(q, k, v, g, beta)
    s0 = jnp.zeros((b * h, d, d), F32)
    do = jax.random.normal(jax.random.PRNGKey(1), ct.u0.shape, bf16)
    r = _Printed()
    r["prepare_fwd_with_glue"] = timeit(prepare, q, k, v, g, beta)
    prepare_kernels = functools.partial(gpu_prep.prepare_fwd, scale=scale, **kw)
    r["prepare_fwd_kernels"] = timeit(jax.jit(prepare_kernels), *prep_in)
    r["kkt"] = timeit(jax.jit(functools.partial(gpu_prep.kkt, scale=scale, **kw)), *prep_in)
    a = gpu_prep.kkt(*prep_in, scale=scale, **kw)[0]

    def solve(warps: int) -> float:
        fn = functools.partial(gpu_prep.solve, dtype=bf16, num_warps=warps, **kw)
        return timeit(jax.jit(fn), a)

    r["solve_w2"] = solve(2)
    t_inv = gpu_prep.solve(a, dtype=bf16, **kw)
    r["wy"] = timeit(jax.jit(functools.partial(gpu_prep.wy, **kw)), t_inv, *prep_in)
    saved = (t_inv, *map(reference.flat_chunks, (ct.w, ct.u0)))
    # (dqg, dp, dw, du0, dkd) in the kernels' flat layout (dqg, dkd shaped like w)
    cots = tuple(map(reference.flat_chunks, (ct.w, ct.p, ct.w, ct.u0, ct.w)))

    def prep_bwd(warps: int) -> float:
        fn = functools.partial(gpu_prep.prepare_bwd, scale=scale, num_warps=warps, **kw)
        return timeit(jax.jit(fn), prep_in, saved, cots)

    r["prepare_bwd_w4"] = prep_bwd(4)
    scan = functools.partial(gpu.scan_fwd, write_states=False, interpret=interpret)
    r["scan_fwd"] = timeit(jax.jit(scan), ct, s0)
    for stages in (1, 2):
        fn = functools.partial(scan, tiling=gpu.Tiling(num_stages=stages))
        r[f"scan_fwd_{stages}_stages"] = timeit(jax.jit(fn), ct, s0)
    r["scan_bwd"] = timeit(jax.jit(functools.partial(gpu.scan_bwd, interpret=interpret)), ct, do, s0, None)
    _, h_states, *_ = jax.jit(functools.partial(gpu.scan_fwd, write_states=True, interpret=interpret))(ct, s0)

    def scan_vjp(ct, h_states, do, ds):  # the reverse scan and the XLA matmuls of the VJP
        du, dh_next, ds0, _ = gpu.scan_bwd(ct, do, ds, None, interpret=interpret)
        return reference.chunk_cotangents(ct, h_states, do, du, dh_next), ds0

    r["scan_bwd_with_xla_matmuls"] = timeit(jax.jit(scan_vjp), ct, h_states, do, s0)
    # The chunk tensors' cotangents alone, XLA (the matmuls and the casts to bf16 the backward ran
    # before the kernel) vs the kernel, on the same inputs; then with the handoff's noisy stream
    # in the same call (other values, so that XLA cannot share its work), and the kernel after the
    # reverse scan.
    du, dh_next, *_ = jax.jit(functools.partial(gpu.scan_bwd, interpret=interpret))(ct, do, s0, None)
    cot_in = (ct, h_states, do, du, dh_next)
    kernel_cots = functools.partial(gpu_cotangents.chunk_cotangents, interpret=interpret)
    r["chunk_cotangents_xla"] = timeit(jax.jit(gpu_cotangents.xla_chunk_cotangents), *cot_in)
    r["chunk_cotangents_kernel"] = timeit(jax.jit(kernel_cots), *cot_in)
    side = ct._replace(w=jnp.flip(ct.w, 0), u0=jnp.flip(ct.u0, 0))
    side_in = (side, jnp.flip(do, 0), jnp.flip(du, 0))

    def xla_two_streams(ct, h, do, du, dh_next, side, do_n, du_n):
        xla = gpu_cotangents.xla_chunk_cotangents
        return xla(ct, h, do, du, dh_next), xla(side, h, do_n, du_n, None)

    def kernel_two_streams(ct, h, do, du, dh_next, side, do_n, du_n, **tiling):
        return kernel_cots(ct, h, do, du, dh_next, noisy=side, do_noisy=do_n, du_noisy=du_n, **tiling)

    r["chunk_cotangents_xla_two_streams"] = timeit(jax.jit(xla_two_streams), *cot_in, *side_in)
    r["chunk_cotangents_kernel_two_streams"] = timeit(jax.jit(kernel_two_streams), *cot_in, *side_in)
    for block_v, warps in ((32, 4), (64, 4), (128, 8)):  # (64, 8) is the default, above
        tiled = functools.partial(kernel_two_streams, block_v=block_v, num_warps=warps)
        name = f"chunk_cotangents_kernel_two_streams_v{block_v}_w{warps}"
        r[name] = timeit(jax.jit(tiled), *cot_in, *side_in)

    def scan_vjp_kernel(ct, h_states, do, ds):  # the reverse scan and the cotangent kernel
        du, dh_next, ds0, _ = gpu.scan_bwd(ct, do, ds, None, interpret=interpret)
        return kernel_cots(ct, h_states, do, du, dh_next), ds0

    r["scan_bwd_with_cotangent_kernel"] = timeit(jax.jit(scan_vjp_kernel), ct, h_states, do, s0)

    args = (q, k, v, g, beta)
    r["fwd_chunk32"] = timeit(forward_fn(backend, chunk_size=32), *args)
    r["fwd_bwd_chunk32"] = timeit(fwd_bwd_fn(backend, chunk_size=32), *args)
    r["solve_w4"], r["solve_w8"] = solve(4), solve(8)
    r["prepare_bwd_w2"], r["prepare_bwd_w8"] = prep_bwd(2), prep_bwd(8)
    return dict(r)


def handoff_inputs(b, t, h, d) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """2T tokens per row (bf16) and all-zero segment ids for the T clean tokens."""
    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, 2 * t, h, h, d, d, jnp.bfloat16)
    return (q, k, v, g, beta), jnp.zeros((b, t), jnp.int32)


@functools.cache
def causal_times(backend, b, t, h, d) -> dict:
    """Plain causal fwd and fwd+bwd over 2T tokens (shared by the handoff block sizes)."""
    plain, _ = handoff_inputs(b, t, h, d)
    return {
        "causal_fwd": timeit(forward_fn(backend), *plain),
        "causal_fwd_bwd": timeit(fwd_bwd_fn(backend), *plain),
    }


def bench_handoff(block_size, backend, b, t, h, d) -> dict:
    """Handoff over T clean + T noisy tokens vs a plain causal pass over 2T tokens."""
    plain, seg = handoff_inputs(b, t, h, d)
    clean = api.GatedDeltaInputs(*(x[:, :t] for x in plain))
    noisy = api.GatedDeltaInputs(*(x[:, t:] for x in plain))

    def handoff(c, n):
        return api.gated_delta_rule_handoff(c, n, block_size=block_size, segment_ids=seg, backend=backend)

    def handoff_loss(c, n):
        oc, on, s = handoff(c, n)
        return jnp.sum(oc.astype(jnp.float32)) + jnp.sum(on.astype(jnp.float32)) + jnp.sum(s)

    r = causal_times(backend, b, t, h, d) | {
        "handoff_fwd": timeit(jax.jit(handoff), clean, noisy),
        "handoff_fwd_bwd": timeit(jax.jit(jax.grad(handoff_loss, argnums=(0, 1))), clean, noisy),
    }
    r["fwd_ratio"] = r["handoff_fwd"] / r["causal_fwd"]
    r["fwd_bwd_ratio"] = r["handoff_fwd_bwd"] / r["causal_fwd_bwd"]
    return r


def guarded(fn: Callable, *args) -> dict:
    """Run one section; print the error and go on (one failure must not lose the others)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a benchmark reports and continues
        traceback.print_exc()
        return {}


def print_shape_row(shape: tuple[int, ...], r: dict) -> None:
    def cell(key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) else format("n/a", ">" + fmt.split(".")[0])

    print(
        f"{'x'.join(map(str, shape)):>20} {cell('ours_fwd', '9.3f')} {cell('fla_fwd', '8.3f')} "
        f"{cell('fwd_vs_fla', '8.2f')} {cell('xla_fwd', '8.3f')} {cell('ours_fwd_bwd', '9.3f')} "
        f"{cell('xla_fwd_bwd', '8.3f')} {cell('fwd_bwd_speedup_vs_xla', '12.2f')}",
        flush=True,
    )


def print_handoff(bs: int, shape: tuple[int, ...], r: dict) -> None:
    b, t, h, d = shape
    print(
        f"handoff bs={bs} ({b}x{t} clean + {t} noisy vs causal {b}x{2 * t}, H{h} D{d}): "
        f"fwd {r['handoff_fwd']:.3f} vs {r['causal_fwd']:.3f} ms ({r['fwd_ratio']:.2f}x), "
        f"fwd+bwd {r['handoff_fwd_bwd']:.3f} vs {r['causal_fwd_bwd']:.3f} ms "
        f"({r['fwd_bwd_ratio']:.2f}x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="gpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument(
        "--check", action="store_true", help="only the correctness check, all layouts and modes"
    )
    parser.add_argument(
        "--layouts", default="", help="Hk x Hv x Dk x Dv of the check, comma separated "
        "(default: the first of CHECK_LAYOUTS, all of them with --check)")
    parser.add_argument("--budget-s", type=float, default=440.0, help="later sections are skipped")
    parser.add_argument("--shapes", default=SHAPES, help="B x T x H x D, comma separated")
    parser.add_argument("--handoff", default=HANDOFF, help="B x T x H x D of the clean stream")
    parser.add_argument("--stages", action="store_true", help="profile at the first shape")
    parser.add_argument("--stages-chunk", type=int, default=64, help="chunk of the --stages profile")
    parser.add_argument("--kernels", action="store_true", help="per-kernel device time at the first shape")
    parser.add_argument("--no-peers", action="store_true", help="skip the XLA reference and fla")
    parser.add_argument("--extra-chunks", default="", help="also time ours at these chunk sizes")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    extra_chunks = tuple(int(c) for c in args.extra_chunks.split(",") if c)
    handoff = tuple(map(int, args.handoff.split("x")))
    layouts = tuple(tuple(map(int, s.split("x"))) for s in args.layouts.split(",") if s) or (
        CHECK_LAYOUTS if args.check else CHECK_LAYOUTS[:1])
    start = time.perf_counter()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    results: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}

    def save() -> None:  # after every section: a run cut short keeps what it measured
        results["elapsed_s"] = time.perf_counter() - start
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def within_budget(name: str) -> bool:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            print(f"skipped {name}: {elapsed:.0f} s > budget {args.budget_s:.0f} s", flush=True)
            results.setdefault("skipped", []).append(name)
            return False
        return True

    if not args.skip_check:
        print("correctness (max relative error vs reference, fp32):")
        for name, errs in guarded(check, args.backend, layouts).items():
            results[f"check_{name}"] = errs
        results["check_s"] = time.perf_counter() - start
        save()
    if args.check:
        return
    print(
        f"{'B x T x H x D':>20} {'ours fwd':>9} {'fla fwd':>8} {'ours/fla':>8} {'xla fwd':>8} "
        f"{'ours f+b':>9} {'xla f+b':>8} {'xla/ours f+b':>12}  (ms)"
    )
    for i, shape in enumerate(shapes):
        name = "x".join(map(str, shape))
        if within_budget(name) and (
            r := guarded(bench_shape, *shape, args.backend, not args.no_peers, extra_chunks)
        ):
            results[name] = r | {"done_at_s": time.perf_counter() - start}
            print_shape_row(shape, r)
            if extra_chunks:
                print("  " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if "chunk" in k), flush=True)
            save()
        if i > 0:
            continue
        if args.kernels and within_budget("kernels"):
            results["kernels"] = guarded(bench_kernels, *shape, args.backend)
            save()
        if args.stages and within_budget("stages"):
            results["stages"] = r = guarded(bench_stages, *shape, args.backend, args.stages_chunk)
            print(f"stages at {name} (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
            save()
        for bs in (32, 64):  # before the larger shapes: a call cut short still has them
            hname = f"handoff_bs{bs}"
            if within_budget(hname) and (r := guarded(bench_handoff, bs, args.backend, *handoff)):
                results[hname] = r
                print_handoff(bs, handoff, r)
                save()
    results["total_s"] = time.perf_counter() - start
    save()


if __name__ == "__main__":
    main()
