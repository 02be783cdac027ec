"""The LM head's cross-entropy gradient ``w (softmax - onehot)`` on one GPU: the Pallas kernel
(``pallas_kernels.ce_logits_grad``) against the XLA fusion of the same expression (its
``reference``, what the position-chunked cross-entropy ran before), on one cross-entropy step
of the 0.8B train step (4096 positions x 248320 ids), logits stored in bf16 and in fp32, output
in bf16. Milliseconds per call (``gated_delta.timeit``), the bandwidth of one read of the logits
and one write of the result, and the largest difference from the XLA result (bf16 units).
``--sweep`` times the kernel at every tiling of ``SWEEP``.

    python benchmarks/ce_logits_grad.py [--rows 4096] [--vocab 248320] [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gated_delta import timeit

from pallas_kernels.ce_logits_grad import ce_logits_grad, gpu, reference

SWEEP = [gpu.Tiling(rows, cols, warps)
         for rows, cols in ((1, 2048), (1, 4096), (1, 8192), (2, 2048), (2, 4096), (4, 1024),
                            (4, 2048), (8, 512), (8, 1024))
         for warps in (4, 8)]


def bench(rows: int, vocab: int, sweep: bool) -> dict:
    x32 = 4.0 * jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    x32 = x32 + jax.random.normal(jax.random.key(1), (rows, 1)) * 3.0
    targets = jax.random.randint(jax.random.key(2), (rows,), 0, vocab)
    weights = jax.random.uniform(jax.random.key(3), (rows,))
    results = {"rows": rows, "vocab": vocab}
    for dtype in (jnp.bfloat16, jnp.float32):
        x = x32.astype(dtype)
        lse = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
        args = (x, lse, targets, weights)
        gbytes = x.size * (x.dtype.itemsize + 2) / 1e9
        xla = jax.jit(lambda *a: reference.ce_logits_grad(*a, jnp.bfloat16))
        want = np.asarray(xla(*args), np.float32)
        candidates = {"kernel": jax.jit(lambda *a: ce_logits_grad(
            *a, out_dtype=jnp.bfloat16, backend="gpu")), "xla": xla}
        if sweep:
            for t in SWEEP:
                candidates[f"kernel_{tuple(t)}"] = jax.jit(lambda *a, t=t: ce_logits_grad(
                    *a, out_dtype=jnp.bfloat16, backend="gpu", tiling=t))
        rows_out = {}
        for name, fn in candidates.items():
            try:
                ms = timeit(fn, *args)
                err = float(np.abs(np.asarray(fn(*args), np.float32) - want).max())
                rows_out[name] = {"ms": ms, "tb_per_s": gbytes / ms, "max_abs_diff": err}
            except Exception as e:  # noqa: BLE001 (a tiling that does not compile: record it)
                rows_out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(jnp.dtype(dtype).name, name, rows_out[name], flush=True)
        results[jnp.dtype(dtype).name] = rows_out
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=248320)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = bench(args.rows, args.vocab, args.sweep)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
