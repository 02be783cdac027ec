"""Expert (grouped) matmul on one GPU: the Pallas kernels against XLA's ``jax.lax.ragged_dot`` and
against one dense matmul of the same FLOPs (the roofline a grouped matmul can at best reach).

Rows are ``tokens * top_k`` token copies sorted by expert, routed uniformly at random over
``experts`` experts (seed 0). Shapes default to the reduced Qwen3-Next FLARE step: 4096 tokens
(2 x 2048), top-10 of 128 experts, hidden 2048, expert width 512; both projections
(``[hidden -> width]`` and ``[width -> hidden]``) and a decoding shape (32 tokens). Prints
milliseconds (median of 10 after a warm-up) of the forward and of forward + backward, and a
correctness check of the compiled kernels against ``ragged_dot`` in fp32.

    python benchmarks/grouped_matmul.py [--tokens 4096 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from block_attention import timed

from pallas_kernels.grouped_matmul.api import grouped_matmul


def routed_rows(tokens: int, top_k: int, experts: int, width: int, seed: int = 0):
    """``[tokens * top_k, width]`` bf16 rows and the group sizes of a uniform random routing."""
    rng = np.random.default_rng(seed)
    choice = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    sizes = np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32)
    x = jax.random.normal(jax.random.key(seed), (tokens * top_k, width), jnp.bfloat16)
    return x, jnp.asarray(sizes)


def fwd_bwd(fn: Callable) -> Callable:
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) ** 2), (0, 1)))


def guarded(fn: Callable, *args, iters: int) -> float | str:
    try:
        return timed(fn, *args, iters=iters)
    except Exception as error:  # noqa: BLE001 - a failing peer (e.g. out of memory) is reported
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def bench(tokens: int, top_k: int, experts: int, c: int, d: int) -> dict:
    x, sizes = routed_rows(tokens, top_k, experts, c)
    w = jax.random.normal(jax.random.key(1), (experts, c, d), jnp.bfloat16) * 0.02
    dense_w = w[0]
    ours = jax.jit(lambda x, w: grouped_matmul(x, w, sizes, backend="gpu"))
    xla = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes,
                                                  preferred_element_type=jnp.float32))
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    row = dict(tokens=tokens, rows=tokens * top_k, experts=experts, c=c, d=d,
               max_group=int(sizes.max()), empty_groups=int((sizes == 0).sum()))
    for name, fn, weights in (("ours", ours, w), ("ragged_dot", xla, w),
                              ("dense_same_flops", dense, dense_w)):
        row[f"{name}_fwd_ms"] = guarded(fn, x, weights, iters=10)
        row[f"{name}_fwd_bwd_ms"] = guarded(fwd_bwd(fn), x, weights, iters=10)
    print(json.dumps(row), flush=True)
    return row


def check() -> dict:
    """Compiled kernels vs ``ragged_dot`` (fp32 operands, 'highest'), values and gradients."""
    x, sizes = routed_rows(300, 4, 16, 128, seed=2)
    x = x.astype(jnp.float32)
    w = jax.random.normal(jax.random.key(3), (16, 128, 256), jnp.float32)
    dy = jax.random.normal(jax.random.key(4), (x.shape[0], 256), jnp.float32)
    errors = {}
    with jax.default_matmul_precision("highest"):
        results = {}
        for backend in ("gpu", "reference"):
            def loss(x, w, backend=backend):
                return jnp.sum(grouped_matmul(x, w, sizes, backend=backend) * dy)
            out = jax.jit(lambda x, w, backend=backend: grouped_matmul(
                x, w, sizes, backend=backend))(x, w)
            results[backend] = (out, *jax.jit(jax.grad(loss, (0, 1)))(x, w))
    for name, got, want in zip(("out", "dx", "dw"), results["gpu"], results["reference"],
                               strict=True):
        errors[name] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    print(json.dumps({"check_max_rel_err": errors}), flush=True)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = {"device": jax.devices()[0].device_kind, "check": check(), "rows": []}
    for tokens in args.tokens:
        for c, d in ((args.hidden, args.width), (args.width, args.hidden)):
            out["rows"].append(bench(tokens, args.top_k, args.experts, c, d))
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
