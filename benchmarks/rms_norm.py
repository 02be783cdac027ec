"""The RMSNorms of the 0.8B FLARE train step on one GPU: the Pallas kernels
(``pallas_kernels.rms_norm``) against XLA's fusions of the jnp norm and its autodiff (the
reference, what the model ran before), bf16, at batch 4 x 2 streams x 4096 tokens: the decoder
layers' ``(1 + w)`` norm of the hidden states ``[4, 8192, 1024]``, the Gated DeltaNet's gated norm
of one stream ``[4, 4096, 16, 128]`` and the attention's q norm ``[4, 8192, 8, 256]``.
Milliseconds per call (``gated_delta.timeit``) of the forward and of forward + backward (``dx``,
``dw`` and ``d_gate`` from ``dy``), the rate of the fewest bytes each must move (forward: read
``x`` [and the gate], write ``y``; backward: also read ``dy``, write ``dx`` [and ``d_gate``]),
and the kernels' largest difference from the reference relative to its largest entry.
``--sweep`` also times forward + backward at every tiling of ``SWEEP``.

    python benchmarks/rms_norm.py [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from gated_delta import max_rel, timeit

from pallas_kernels.rms_norm import gpu, rms_norm

SHAPES = {"hidden": ((4, 8192, 1024), False), "gated": ((4, 4096, 16, 128), True),
          "q_norm": ((4, 8192, 8, 256), False)}
SWEEP = [gpu.Tiling(elements, tiles, warps) for elements in (4096, 8192, 16384)
         for tiles in (4, 16) for warps in (4, 8)]


def _functions(gated: bool, backend: str, tiling: gpu.Tiling | None):
    def norm(x, w, g):
        return rms_norm(x, w, gate=g if gated else None, eps=1e-6, unit_offset=not gated,
                        backend=backend, tiling=tiling)

    def fwd_bwd(x, w, g, dy):
        y, vjp = jax.vjp(norm, x, w, g)
        return y, vjp(dy)

    return jax.jit(norm), jax.jit(fwd_bwd)


def bench(sweep: bool) -> dict:
    results = {}
    for name, (shape, gated) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), 4)
        x, g, dy = (jax.random.normal(k, shape, jnp.bfloat16) for k in keys[:3])
        w = 1.0 + 0.1 * jax.random.normal(keys[3], shape[-1:])
        tensor_gb = x.size * x.dtype.itemsize / 1e9
        fwd_gb, bwd_gb = tensor_gb * (3 if gated else 2), tensor_gb * (5 if gated else 3)
        candidates = {"xla": ("reference", None), "kernel": ("gpu", None)}
        if sweep:
            candidates.update({f"kernel_{tuple(t)}": ("gpu", t) for t in SWEEP})
        rows, want = {}, None
        for label, (backend, tiling) in candidates.items():
            fwd, fwd_bwd = _functions(gated, backend, tiling)
            try:
                row = {"fwd_ms": timeit(fwd, x, w, g), "fwd_bwd_ms": timeit(fwd_bwd, x, w, g, dy)}
            except Exception as e:  # noqa: BLE001 (a tiling that does not compile: record it)
                rows[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(name, label, rows[label], flush=True)
                continue
            row["fwd_tb_per_s"] = fwd_gb / row["fwd_ms"]
            row["fwd_bwd_tb_per_s"] = (fwd_gb + bwd_gb) / row["fwd_bwd_ms"]
            got = jax.tree.leaves(fwd_bwd(x, w, g, dy))
            if want is None:
                want = got
            row["max_rel_diff"] = max(max_rel(a.astype(jnp.float32), b.astype(jnp.float32))
                                      for a, b in zip(got, want, strict=True))
            rows[label] = row
            print(name, label, {k: round(v, 4) for k, v in row.items()}, flush=True)
        rows["kernel_over_xla_fwd_bwd"] = rows["kernel"]["fwd_bwd_ms"] / rows["xla"]["fwd_bwd_ms"]
        print(name, "kernel / xla (fwd + bwd):", round(rows["kernel_over_xla_fwd_bwd"], 3), flush=True)
        results[name] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = bench(args.sweep)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
