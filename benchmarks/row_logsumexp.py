"""The LM head's logsumexp on one GPU: the Pallas row kernel (``pallas_kernels.row_logsumexp``)
against XLA's one-pass variadic reduction (``flare_jax.logsumexp.max_sum_exp``, what the
position-chunked cross-entropy ran before) and XLA's two-pass ``jax.nn.logsumexp``, on the
logits of one cross-entropy step of the 0.8B train step (4096 positions x 248320 ids), stored in
bf16 and in fp32. Milliseconds per call (``gated_delta.timeit``), the bandwidth of one read of
the logits, and each result's largest difference from the fp64 logsumexp. ``--sweep`` times the
kernel at every tiling of ``SWEEP``.

    python benchmarks/row_logsumexp.py [--rows 4096] [--vocab 248320] [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gated_delta import timeit

from flare_jax.logsumexp import max_sum_exp
from pallas_kernels.row_logsumexp import gpu, row_logsumexp

SWEEP = [gpu.Tiling(rows, cols, warps, stages)
         for rows, cols in ((1, 4096), (1, 8192), (2, 2048), (2, 4096), (4, 1024), (4, 2048),
                            (4, 4096), (8, 1024))
         for warps in (2, 4, 8) for stages in (2, 3)]


def _one_pass(x: jax.Array) -> jax.Array:
    m, s = max_sum_exp(x)
    return m + jnp.log(s)


def bench(rows: int, vocab: int, sweep: bool) -> dict:
    # logits of a trained head: a spread of ~4 around a row offset, a few large entries
    x32 = 4.0 * jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    x32 = x32 + jax.random.normal(jax.random.key(1), (rows, 1)) * 3.0
    results = {"rows": rows, "vocab": vocab}
    for dtype in (jnp.bfloat16, jnp.float32):
        x = x32.astype(dtype)
        exact = np.asarray(jax.nn.logsumexp(np.asarray(x, np.float64), axis=-1))
        gbytes = x.size * x.dtype.itemsize / 1e9
        candidates = {"kernel": jax.jit(lambda x: row_logsumexp(x, backend="gpu")),
                      "xla_one_pass": jax.jit(lambda x: _one_pass(x.astype(jnp.float32))),
                      "xla_two_pass": jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32),
                                                                         axis=-1))}
        if sweep:
            for t in SWEEP:
                candidates[f"kernel_{tuple(t)}"] = jax.jit(
                    lambda x, t=t: row_logsumexp(x, backend="gpu", tiling=t))
        rows_out = {}
        for name, fn in candidates.items():
            try:
                ms = timeit(fn, x)
                err = float(np.abs(np.asarray(fn(x), np.float64) - exact).max())
                rows_out[name] = {"ms": ms, "read_tb_per_s": gbytes / ms, "max_abs_err": err}
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
