"""The LM head's softmax terms on one GPU, on the logits of one cross-entropy step of the 0.8B
train step (4096 positions x 248320 ids, stored in bf16 and in fp32): the Pallas row kernel
(``pallas_kernels.row_softmax``: logsumexp and ``exp(x - offset)`` in bf16, one read and one
write), against XLA's fusions of the same outputs (``reference.row_softmax``), and against what
the cross-entropy ran before (the kernel's logsumexp alone, then XLA's pass writing
``d_logits = w (softmax - onehot)`` in bf16: two reads and one write). Milliseconds per call
(``gated_delta.timeit``), the bandwidth of the bytes each must move at least (read the logits,
write the bf16 terms), and each logsumexp's largest difference from the fp64 one. ``--sweep``
times the kernel at every tiling of ``SWEEP``.

    python benchmarks/row_softmax.py [--rows 4096] [--vocab 248320] [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gated_delta import timeit

from pallas_kernels.row_softmax import gpu, reference, row_softmax

SWEEP = [gpu.Tiling(rows, cols, warps, stages)
         for rows, cols in ((1, 2048), (1, 4096), (1, 8192), (2, 2048), (2, 4096), (4, 1024))
         for warps in (4, 8) for stages in (2, 3)]
BF16 = jnp.bfloat16


def _two_passes(x: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple:
    """The cross-entropy's passes before the kernel wrote the exponentials."""
    lse = row_softmax(x, backend="gpu").lse
    onehot = jnp.arange(x.shape[1]) == targets[:, None]
    d = weights[:, None] * (jnp.exp(x.astype(jnp.float32) - lse[:, None]) - onehot)
    return d.astype(BF16), lse


def bench(rows: int, vocab: int, sweep: bool) -> dict:
    # logits of a trained head: a spread of ~4 around a row offset
    x32 = 4.0 * jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    x32 = x32 + jax.random.normal(jax.random.key(1), (rows, 1)) * 3.0
    targets = jax.random.randint(jax.random.key(2), (rows,), 0, vocab)
    weights = jax.random.uniform(jax.random.key(3), (rows,))
    results = {"rows": rows, "vocab": vocab}
    for dtype in (BF16, jnp.float32):
        x = x32.astype(dtype)
        hint = jnp.take_along_axis(x, targets[:, None], axis=1)[:, 0].astype(jnp.float32)
        exact = np.asarray(jax.nn.logsumexp(np.asarray(x, np.float64), axis=-1))
        gbytes = x.size * (x.dtype.itemsize + 2) / 1e9
        candidates = {
            "kernel": jax.jit(lambda x, hint=hint: row_softmax(
                x, hint, exp_dtype=BF16, backend="gpu")[:2]),
            "xla": jax.jit(lambda x: reference.row_softmax(x, BF16)[:2]),
            "before_lse_then_d_logits": jax.jit(lambda x: _two_passes(x, targets, weights)),
        }
        if sweep:
            for t in SWEEP:
                candidates[f"kernel_{tuple(t)}"] = jax.jit(
                    lambda x, t=t, hint=hint: row_softmax(x, hint, exp_dtype=BF16,
                                                          backend="gpu", tiling=t)[:2])
        rows_out = {}
        for name, fn in candidates.items():
            try:
                ms = timeit(fn, x)
                err = float(np.abs(np.asarray(fn(x)[1], np.float64) - exact).max())
                rows_out[name] = {"ms": ms, "tb_per_s": gbytes / ms, "lse_max_abs_err": err}
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
