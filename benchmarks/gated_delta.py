"""Gated delta rule on one GPU: our Pallas path vs the XLA jnp reference and fla, in one run.

Prints a correctness check of the compiled kernels against the reference (fp32), then forward and
forward+backward times (bf16 inputs) with ratios, and the handoff-mode cost against a plain causal
forward over the same number of tokens. ``--json PATH`` writes the numbers after every section;
sections that would start after ``--budget-s`` seconds are skipped. ``--check``: only the full
correctness check (all head layouts, handoff gradients, bf16 inputs).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import api

F32 = jnp.float32

SHAPES = ((8, 4096, 16, 128), (1, 32768, 16, 128), (4, 16384, 32, 128))


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


def timeit(fn: Callable, *args, iters: int = 10) -> float:
    """Median milliseconds per call (after a compile + warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def check_case(backend: str, hk: int, hv: int, dk: int, dv: int, full: bool) -> dict:
    """One fp32 case: outputs, final state and gradients vs the reference; with ``full`` also the
    handoff gradients and the bf16-input output error."""
    b, t = 2, 300
    (q, k, v, g, beta), s0 = make_inputs(jax.random.PRNGKey(dk), b, t, hk, hv, dk, dv, F32)
    noisy, _ = make_inputs(jax.random.PRNGKey(7), b, t, hk, hv, dk, dv, F32)
    seg = np.cumsum(np.random.default_rng(0).random((b, t)) < 0.01, axis=1)
    seg = jnp.asarray(seg, jnp.int32)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape)

    def loss(q, k, v, g, beta, s0, backend):
        o, s = api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, backend=backend)
        return jnp.sum(o * dy) + jnp.sum(s * s), (o, s)

    def handoff_loss(clean, noisy, s0, backend):
        oc, on, s = api.gated_delta_rule_handoff(
            api.GatedDeltaInputs(*clean),
            api.GatedDeltaInputs(*noisy),
            block_size=32,
            segment_ids=seg,
            initial_state=s0,
            backend=backend,
        )
        return jnp.sum(oc * dy) + jnp.sum(on * jnp.flip(dy, 1)) + jnp.sum(s * s)

    grad = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True), static_argnames="backend")
    (gk, (ok, sk)), (gr, (o_r, s_r)) = (
        grad(q, k, v, g, beta, s0, backend=be) for be in (backend, "reference")
    )
    errs = {"o": max_rel(ok, o_r), "state": max_rel(sk, s_r)}
    errs |= {n: max_rel(x, y) for n, x, y in zip(GRAD_NAMES, gk, gr, strict=True)}
    if not full:
        return errs
    hgrad = jax.jit(jax.grad(handoff_loss, argnums=(0, 1, 2)), static_argnames="backend")
    gh = [jax.tree.leaves(hgrad((q, k, v, g, beta), noisy, s0, backend=be)) for be in (backend, "reference")]
    errs["handoff_grads"] = max(max_rel(x, y) for x, y in zip(*gh, strict=True))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)] + [g, beta]
    o_bf16, _ = jax.jit(api.gated_delta_rule, static_argnames="backend")(
        *bf16, initial_state=s0, segment_ids=seg, backend=backend
    )
    errs["o_bf16_vs_fp32_ref"] = max_rel(o_bf16, o_r)
    return errs


CHECK_LAYOUTS = ((2, 4, 128, 128), (1, 2, 64, 256))  # (Hk, Hv, Dk, Dv)


def check(backend: str, full: bool) -> dict:
    """Compiled kernel vs reference in fp32: all head layouts and modes with ``full``, else the
    first layout's plain mode (Triton and XLA compiles are the cost of this section)."""
    layouts = CHECK_LAYOUTS if full else CHECK_LAYOUTS[:1]
    return {
        f"hk{hk}_hv{hv}_dk{dk}_dv{dv}": check_case(backend, hk, hv, dk, dv, full)
        for hk, hv, dk, dv in layouts
    }


def fla_forward_ms(q, k, v, g, beta) -> float | None:
    """fla ``chunk_gated_delta_rule`` forward on the same inputs (None if fla is missing)."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    tt = [torch.from_numpy(np.array(x.astype(jnp.float32))).cuda() for x in (q, k, v, g, beta)]
    tq, tk, tv, tbeta = (x.to(torch.bfloat16) for x in (tt[0], tt[1], tt[2], tt[4]))
    tg = tt[3]
    run = lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tbeta, output_final_state=True)
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


def bench_shape(b, t, h, d, backend) -> dict:
    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, t, h, h, d, d, jnp.bfloat16)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape, jnp.bfloat16)

    def fwd(be):
        return jax.jit(lambda *a: api.gated_delta_rule(*a, backend=be))

    def fwd_bwd(be):
        def loss(*a):
            o, s = api.gated_delta_rule(*a, backend=be)
            return jnp.sum(o.astype(jnp.float32) * dy) + jnp.sum(s)

        return jax.jit(jax.grad(loss, argnums=range(5)))

    args = (q, k, v, g, beta)
    r = {
        "ours_fwd": timeit(fwd(backend), *args),
        "ours_fwd_bwd": timeit(fwd_bwd(backend), *args),
        "xla_fwd": timeit(fwd("reference"), *args, iters=3),
        "xla_fwd_bwd": timeit(fwd_bwd("reference"), *args, iters=3),
        "fla_fwd": fla_forward_ms(*args),
    }
    r["fwd_vs_fla"] = r["ours_fwd"] / r["fla_fwd"] if r["fla_fwd"] else None
    r["fwd_bwd_speedup_vs_xla"] = r["xla_fwd_bwd"] / r["ours_fwd_bwd"]
    r["fwd_speedup_vs_xla"] = r["xla_fwd"] / r["ours_fwd"]
    return r


def bench_handoff(b, t, h, d, block_size, backend) -> dict:
    """Handoff over T clean + T noisy tokens vs a plain causal pass over 2T tokens."""
    (q, k, v, g, beta), _ = make_inputs(jax.random.PRNGKey(0), b, 2 * t, h, h, d, d, jnp.bfloat16)
    seg = jnp.zeros((b, t), jnp.int32)
    plain = (q, k, v, g, beta)
    clean = api.GatedDeltaInputs(*(x[:, :t] for x in plain))
    noisy = api.GatedDeltaInputs(*(x[:, t:] for x in plain))

    def causal_loss(*a):
        o, s = api.gated_delta_rule(*a, backend=backend)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    def handoff_loss(c, n):
        oc, on, s = api.gated_delta_rule_handoff(
            c, n, block_size=block_size, segment_ids=seg, backend=backend
        )
        return jnp.sum(oc.astype(jnp.float32)) + jnp.sum(on.astype(jnp.float32)) + jnp.sum(s)

    r = {
        "causal_fwd": timeit(jax.jit(lambda *a: api.gated_delta_rule(*a, backend=backend)), *plain),
        "handoff_fwd": timeit(
            jax.jit(
                lambda c, n: api.gated_delta_rule_handoff(
                    c, n, block_size=block_size, segment_ids=seg, backend=backend
                )
            ),
            clean,
            noisy,
        ),
        "causal_fwd_bwd": timeit(jax.jit(jax.grad(causal_loss, argnums=range(5))), *plain),
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
    fla = f"{r['fla_fwd']:8.3f}" if r["fla_fwd"] else "     n/a"
    ratio = f"{r['fwd_vs_fla']:8.2f}" if r["fwd_vs_fla"] else "     n/a"
    print(
        f"{'x'.join(map(str, shape)):>20} {r['ours_fwd']:9.3f} {fla} {ratio} "
        f"{r['xla_fwd']:8.3f} {r['ours_fwd_bwd']:9.3f} {r['xla_fwd_bwd']:8.3f} "
        f"{r['fwd_bwd_speedup_vs_xla']:12.2f}",
        flush=True,
    )


def print_handoff(bs: int, r: dict) -> None:
    print(
        f"handoff bs={bs} (8x4096 clean + 4096 noisy vs causal 8x8192, H16 D128): "
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
    parser.add_argument("--budget-s", type=float, default=300.0, help="later sections are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    results: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}

    def save() -> None:  # after every section: a run cut short keeps what it measured
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
        for name, errs in guarded(check, args.backend, args.check).items():
            print(f"  {name}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
            results[f"check_{name}"] = errs
        results["check_s"] = time.perf_counter() - start
        save()
    if args.check:
        return
    print(
        f"{'B x T x H x D':>20} {'ours fwd':>9} {'fla fwd':>8} {'ours/fla':>8} {'xla fwd':>8} "
        f"{'ours f+b':>9} {'xla f+b':>8} {'xla/ours f+b':>12}  (ms)"
    )
    for shape in SHAPES:
        name = "x".join(map(str, shape))
        if within_budget(name) and (r := guarded(bench_shape, *shape, args.backend)):
            results[name] = r
            print_shape_row(shape, r)
            save()
    for bs in (32, 64):
        name = f"handoff_bs{bs}"
        if within_budget(name) and (r := guarded(bench_handoff, 8, 4096, 16, 128, bs, args.backend)):
            results[name] = r
            print_handoff(bs, r)
            save()
    results["total_s"] = time.perf_counter() - start
    save()


if __name__ == "__main__":
    main()
