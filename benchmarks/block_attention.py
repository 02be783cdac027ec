"""Block attention on one GPU: the FLARE ``[clean ; noisy]`` row over 2L tokens against peers.

Peers: plain causal attention over 2L tokens (our kernel with a causal layout, and cuDNN flash via
``jax.nn.dot_product_attention(is_causal=True)``) and the FLARE mask materialised for
``jax.nn.dot_product_attention`` (XLA, and cuDNN where it accepts a mask). Prints milliseconds
(median) and ratios; peers that fail or run out of memory are reported as such.

    python benchmarks/block_attention.py --lengths 4096 8192 32768 [--check] [--decode] [--sweep L]
        [--orders L]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_attention import gpu
from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout, dense_mask


def flare_layout(length: int, block_size: int, batch: int) -> TokenLayout:
    """One document of ``length`` tokens per row, as the packed ``[clean ; noisy]`` layout."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    zeros = jnp.zeros_like(pos)
    clean = TokenLayout(zeros, pos, pos // block_size, zeros)
    return clean.concat(TokenLayout(zeros, pos, pos // block_size, zeros + 1))


def causal_layout(length: int, batch: int) -> TokenLayout:
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return TokenLayout.causal(jnp.zeros_like(pos), pos)


def denoise_layout(cache_len: int, filled: int, block_size: int, batch: int):
    """A noisy block of ``block_size`` queries after ``filled`` cached tokens, and the cache."""
    slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (batch, cache_len))
    seg = jnp.where(slots < filled, 0, EMPTY_SEGMENT)
    kv = TokenLayout(seg, slots, slots // block_size, jnp.zeros_like(slots))
    qpos = filled + jnp.broadcast_to(jnp.arange(block_size, dtype=jnp.int32), (batch, block_size))
    q = TokenLayout(jnp.zeros_like(qpos), qpos, qpos // block_size, jnp.ones_like(qpos))
    return q, kv


def timed(fn: Callable, *args, iters: int) -> float:
    """Median wall time in ms of ``fn(*args)`` after one warm-up call (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def with_grad(attend: Callable) -> Callable:
    """fwd+bwd: gradients of q, k, v for a fixed output cotangent."""

    def run(q, k, v, d_out, *extra):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, *extra), q, k, v)
        return vjp(d_out.astype(out.dtype))

    return run


def ours(q, k, v, q_layout, kv_layout):
    return block_attention(q, k, v, q_layout, kv_layout, backend="gpu")


def reference(q, k, v, q_layout, kv_layout):
    return block_attention(q, k, v, q_layout, kv_layout, backend="reference")


def sdpa(implementation: str, q, k, v, mask=None, causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=implementation)


def measure(name: str, fn: Callable, args, iters: int, results: dict) -> None:
    try:
        results[name] = timed(jax.jit(fn), *args, iters=iters)
    except Exception as err:  # noqa: BLE001 - peers may OOM or refuse a shape; report and go on
        results[name] = None
        print(f"  {name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    else:
        print(f"  {name}: {results[name]:.3f} ms", flush=True)


def bench_length(length: int, args) -> dict:
    """All timings for one L (2L tokens per row)."""
    shape_q = (args.batch, 2 * length, args.heads, args.head_dim)
    shape_kv = (args.batch, 2 * length, args.kv_heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q, d_out = (jax.random.normal(kk, shape_q, jnp.bfloat16) for kk in keys[:2])
    k, v = (jax.random.normal(kk, shape_kv, jnp.bfloat16) for kk in keys[2:])
    flare = flare_layout(length, args.block_size, args.batch)
    causal = causal_layout(2 * length, args.batch)
    iters = args.iters if length <= 8192 else max(3, args.iters // 3)
    res: dict = {}
    print(f"L={length} (2L={2 * length} tokens), B={args.batch}", flush=True)
    measure("flare_fwd", ours, (q, k, v, flare, flare), iters, res)
    measure("flare_fwdbwd", with_grad(ours), (q, k, v, d_out, flare, flare), iters, res)
    measure("causal_fwd", ours, (q, k, v, causal, causal), iters, res)
    measure("causal_fwdbwd", with_grad(ours), (q, k, v, d_out, causal, causal), iters, res)
    cudnn_causal = functools.partial(sdpa, "cudnn", causal=True)
    measure("cudnn_causal_fwd", cudnn_causal, (q, k, v), iters, res)
    measure("cudnn_causal_fwdbwd", with_grad(cudnn_causal), (q, k, v, d_out), iters, res)
    if length <= args.max_dense_length:
        mask = jax.jit(dense_mask)(flare, flare)[:, None]
        for impl in ("xla", "cudnn"):
            masked = functools.partial(sdpa, impl)
            measure(f"{impl}_mask_fwd", masked, (q, k, v, mask), iters, res)
            measure(f"{impl}_mask_fwdbwd", with_grad(masked), (q, k, v, d_out, mask), iters, res)
        del mask
    else:
        print(f"  dense-mask peers skipped: the [2L, 2L] mask and scores at L={length} exceed "
              "GPU memory")
    return res


def ratio(num, den) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}"


def report(all_results: dict[int, dict]) -> None:
    cols = ["flare_fwd", "flare_fwdbwd", "causal_fwd", "causal_fwdbwd", "cudnn_causal_fwd",
            "cudnn_causal_fwdbwd", "xla_mask_fwd", "xla_mask_fwdbwd", "cudnn_mask_fwd",
            "cudnn_mask_fwdbwd"]
    print("\n| L | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for length, res in all_results.items():
        cells = ["-" if res.get(c) is None else f"{res[c]:.2f}" for c in cols]
        print(f"| {length} | " + " | ".join(cells) + " |")
    print("\nratios (fwd+bwd): flare/cudnn_causal, flare/our_causal, xla_mask/flare, "
          "cudnn_mask/flare")
    for length, res in all_results.items():
        fb = res.get("flare_fwdbwd")
        print(f"L={length}: {ratio(fb, res.get('cudnn_causal_fwdbwd'))}, "
              f"{ratio(fb, res.get('causal_fwdbwd'))}, {ratio(res.get('xla_mask_fwdbwd'), fb)}, "
              f"{ratio(res.get('cudnn_mask_fwdbwd'), fb)}")


def check(args) -> None:
    """Compiled kernels (bf16) against the fp32 reference: FLARE row with two documents, GQA."""
    seg = jnp.asarray(np.repeat([0, 1], [173, 127])[None].repeat(2, 0), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(173), np.arange(127)])[None].repeat(2, 0))
    blk = jnp.arange(300, dtype=jnp.int32)[None].repeat(2, 0) // args.block_size
    clean = TokenLayout(seg, pos, blk, jnp.zeros_like(seg))
    layout = clean.concat(TokenLayout(seg, pos, blk, jnp.ones_like(seg)))
    dq_layout, dkv_layout = denoise_layout(1000, 613, args.block_size, 2)
    for head_dim in (64, 128, 256):
        cases = {"flare": (layout, layout), "denoise": (dq_layout, dkv_layout)}
        for name, (ql, kl) in cases.items():
            keys = jax.random.split(jax.random.PRNGKey(head_dim), 4)
            q = jax.random.normal(keys[0], (2, ql.shape[1], 8, head_dim), jnp.bfloat16)
            d_out = jax.random.normal(keys[1], q.shape, jnp.float32)
            k, v = (jax.random.normal(kk, (2, kl.shape[1], 2, head_dim), jnp.bfloat16)
                    for kk in keys[2:])
            f32 = [a.astype(jnp.float32) for a in (q, k, v)]
            got = (jax.jit(ours)(q, k, v, ql, kl), *jax.jit(with_grad(ours))(q, k, v, d_out, ql, kl))
            with jax.default_matmul_precision("highest"):
                want = (jax.jit(reference)(*f32, ql, kl),
                        *jax.jit(with_grad(reference))(*f32, d_out, ql, kl))
            errs = []
            for a, b in zip(got, want, strict=True):
                a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                errs.append(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
            print(f"check D={head_dim} {name}: max |err| / max |ref| for out, dq, dk, dv = "
                  + ", ".join(f"{e:.2e}" for e in errs), flush=True)


def bench_denoise(args) -> None:
    """A 32-token noisy block against a long cache: our kernel vs XLA with the mask materialised."""
    for cache_len in (8192, 32768):
        ql, kl = denoise_layout(cache_len, cache_len - args.block_size, args.block_size,
                                args.decode_batch)
        keys = jax.random.split(jax.random.PRNGKey(cache_len), 3)
        q = jax.random.normal(keys[0], (args.decode_batch, args.block_size, args.heads,
                                        args.head_dim), jnp.bfloat16)
        k, v = (jax.random.normal(kk, (args.decode_batch, cache_len, args.kv_heads,
                                       args.head_dim), jnp.bfloat16) for kk in keys[1:])
        mask = dense_mask(ql, kl)[:, None]
        res: dict = {}
        print(f"denoise: B={args.decode_batch}, {args.block_size} queries vs {cache_len} slots")
        measure("ours", ours, (q, k, v, ql, kl), args.iters, res)
        measure("xla_mask", functools.partial(sdpa, "xla"), (q, k, v, mask), args.iters, res)
        print(f"  xla_mask/ours = {ratio(res['xla_mask'], res['ours'])}")


# Candidates per kernel (block_q, block_k, warps, stages); at D=256 some exceed shared memory
# and are reported as failed (docs/performance.md, "Block attention launch parameters").
T = gpu.Tiling
FWD_SWEEP = (T(128, 64, 8, 1), T(128, 64, 8, 2), T(128, 64, 8, 3), T(128, 64, 4, 2),
             T(64, 64, 4, 2), T(128, 32, 8, 2))
DQ_SWEEP = (T(128, 32, 8, 1), T(128, 32, 8, 2), T(128, 32, 8, 3), T(128, 32, 4, 2),
            T(64, 64, 8, 2), T(64, 64, 4, 2), T(64, 32, 4, 2), T(128, 64, 8, 1))
DKV_SWEEP = (T(128, 32, 8, 1), T(128, 32, 8, 2), T(128, 32, 8, 3), T(128, 32, 4, 2),
             T(64, 64, 8, 1), T(64, 64, 8, 2), T(64, 64, 4, 2), T(64, 32, 4, 2),
             T(32, 64, 4, 2), T(128, 64, 8, 1), T(64, 128, 8, 1))
TILE_SWEEP = (FWD_SWEEP, {"dq_tiling": DQ_SWEEP, "dkv_tiling": DKV_SWEEP})
# Launch orders of the D=256 defaults: how many (batch, head) rows take each tile side by side.
ORDER_SWEEP = ([gpu.FWD_TILES[256]._replace(side_by_side=n) for n in (1, 2, 4, 8)],
               {"dq_tiling": [gpu.DQ_TILES[256]._replace(side_by_side=n) for n in (1, 2, 4, 8, 16)],
                "dkv_tiling": [gpu.DKV_TILES[256]._replace(side_by_side=n) for n in (1, 2, 4, 8)]})


def sweep_tiles(length: int, args, candidates: tuple) -> None:
    """Forward, and backward with one kernel's tiling varied, per candidate on the FLARE row
    (``candidates``: forward tilings and, per backward kernel, its tilings)."""
    shape_q = (args.batch, 2 * length, args.heads, args.head_dim)
    shape_kv = (args.batch, 2 * length, args.kv_heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, d_out = (jax.random.normal(kk, shape_q, jnp.bfloat16) for kk in keys[:2])
    k, v = (jax.random.normal(kk, shape_kv, jnp.bfloat16) for kk in keys[2:])
    layout = flare_layout(length, args.block_size, args.batch)
    scale = args.head_dim**-0.5
    out, lse = jax.jit(functools.partial(gpu.forward, scale=scale))(q, k, v, layout, layout)
    d = args.head_dim
    print(f"tile sweep at B={args.batch}, L={length}, D={d} (defaults fwd {gpu.FWD_TILES.get(d)}, "
          f"dq {gpu.DQ_TILES.get(d)}, dkv {gpu.DKV_TILES.get(d)})")
    res: dict = {}
    fwd_candidates, bwd_candidates = candidates
    for tiling in fwd_candidates:
        fwd = functools.partial(gpu.forward, scale=scale, tiling=tiling)
        measure(f"fwd {tuple(tiling)}", fwd, (q, k, v, layout, layout), args.iters, res)
    bwd_args = (q, k, v, layout, layout, out, lse, d_out)
    for name, sweep in bwd_candidates.items():
        for tiling in sweep:
            bwd = functools.partial(gpu.backward, scale=scale, **{name: tiling})
            measure(f"bwd {name} {tuple(tiling)}", bwd, bwd_args, args.iters, res)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-dense-length", type=int, default=8192)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="compiled vs reference first")
    parser.add_argument("--decode", action="store_true", help="also time the denoise shape")
    parser.add_argument("--sweep", type=int, default=0, help="L of a tile-shape sweep (0: none)")
    parser.add_argument("--orders", type=int, default=0,
                        help="L of a sweep of the kernels' launch orders (0: none)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; H={args.heads} "
          f"Hkv={args.kv_heads} D={args.head_dim} block={args.block_size}", flush=True)
    if args.check:
        check(args)
    report({length: bench_length(length, args) for length in args.lengths})
    if args.decode:
        bench_denoise(args)
    if args.sweep:
        sweep_tiles(args.sweep, args, TILE_SWEEP)
    if args.orders:
        sweep_tiles(args.orders, args, ORDER_SWEEP)


if __name__ == "__main__":
    main()
