"""The Gated DeltaNet's causal depthwise conv + SiLU on one GPU: ours (``backend="gpu"``: Pallas
forward and backward kernels), autodiff of the jnp forward (``backend="reference"``, what XLA
fuses on its own), and XLA's depthwise ``conv_general_dilated`` + SiLU (one document, no handoff)
on the same bf16 inputs; plain (four documents per row) and FLARE handoff (block 32). Shape
defaults to one FLARE stream of a Qwen3.5-0.8B linear layer in the batch-4 train step (4 x 4096
tokens, conv dim 6144, kernel 4). Milliseconds per call (``gated_delta.timeit``: 10 calls back
to back, median of 5 such runs, after a warm-up); also the largest gradient difference between
ours and autodiff.
``--sweep`` also times our kernels alone at each ``gpu.ConvTiling`` of ``SWEEP``; with
``--norm`` they run as the Gated DeltaNet calls them (the first two thirds of the channels
l2-normalised in heads of 128, the output written as three parts) at the tilings of
``NORM_SWEEP`` (a tile is one head). Last, both FLARE streams as one op against two calls
(``bench_pair``).

    python benchmarks/conv.py [--batch 4] [--tokens 4096] [--channels 6144] [--sweep] [--norm]
                              [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from gated_delta import timeit

from pallas_kernels.causal_conv import causal_conv_silu, gpu, reference
from pallas_kernels.causal_conv.api import causal_conv_silu_pair

KERNEL = 4


def xla_conv_silu(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Depthwise causal conv by ``conv_general_dilated`` (left padding K-1), SiLU in fp32."""
    out = jax.lax.conv_general_dilated(
        x, weight[:, None, :].astype(x.dtype), window_strides=(1,), padding=[(KERNEL - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=x.shape[-1],
        preferred_element_type=jnp.float32)
    return jax.nn.silu(out).astype(x.dtype)


# 28 tilings around the best of the former 12 (32 positions, 64 / 128 channels, 4 / 8 warps): one
# tile per program, or 4 or 8 walked in a loop at 1-3 pipeline stages.
LOOPS = [(1, 1)] + [(tiles, stages) for tiles in (4, 8) for stages in (1, 2, 3)]
SWEEP = [gpu.ConvTiling(32, c, w, tiles, stages) for c in (64, 128) for w in (4, 8)
         for tiles, stages in LOOPS]
NORM_SWEEP = [gpu.ConvTiling(t, 128, w, tiles, stages) for t in (16, 32, 64) for w in (4, 8)
              for tiles, stages in ((1, 1), (4, 2))]
HEAD_DIM = 128


def gradients(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), (0, 1)))


def bench(batch: int, tokens: int, channels: int, block_size: int, sweep: bool, norm: bool) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, tokens, channels), jnp.bfloat16)
    clean = jax.random.normal(keys[1], (batch, tokens, channels), jnp.bfloat16)
    weight = jax.random.normal(keys[2], (KERNEL, channels), jnp.float32) * 0.5
    segment_ids = jnp.broadcast_to(jnp.arange(tokens) // 1024, (batch, tokens)).astype(jnp.int32)
    row = dict(batch=batch, tokens=tokens, channels=channels, block_size=block_size, norm=norm)
    third = channels // 3
    heads = reference.HeadNorm(HEAD_DIM, 2 * third) if norm else None
    split_at = (third, 2 * third) if norm else ()
    defaults = [gpu.FWD_TILING, gpu.NORM_BWD_TILING if norm else gpu.BWD_TILING]
    tilings = (NORM_SWEEP if norm else SWEEP) if sweep else defaults
    for mode in ("plain", "handoff"):
        def conv(backend, mode=mode):
            if mode == "plain":
                return lambda x, w: causal_conv_silu(x, w, segment_ids, backend=backend)
            return lambda x, c: causal_conv_silu(x, weight, segment_ids, clean=c,
                                                 block_size=block_size, backend=backend)

        second = weight if mode == "plain" else clean
        peers = [("ours", conv("gpu")), ("autodiff", conv("reference"))]
        if mode == "plain" and batch == 1:
            peers.append(("xla_conv", xla_conv_silu))
        for name, fn in peers:
            row[f"{mode}_{name}_fwd"] = timeit(jax.jit(fn), x, second)
            row[f"{mode}_{name}_fwd_bwd"] = timeit(gradients(fn), x, second)
        ours, auto = gradients(peers[0][1])(x, second), gradients(peers[1][1])(x, second)
        row[f"{mode}_max_rel_grad_diff"] = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(ours, auto, strict=True))
        row[f"{mode}_autodiff_over_ours_fwd_bwd"] = (row[f"{mode}_autodiff_fwd_bwd"]
                                                     / row[f"{mode}_ours_fwd_bwd"])
        handoff = None if mode == "plain" else clean
        block = None if handoff is None else block_size
        for tiling in tilings:
            name = (f"{mode}_t{tiling.block_t}_c{tiling.block_c}_w{tiling.num_warps}"
                    f"_r{tiling.tiles_per_program}_s{tiling.num_stages}")
            fwd = jax.jit(lambda x, c, w, seg, tiling=tiling, block=block: gpu.conv_silu_fwd(
                x, None, c, w, seg, block, heads, split_at, tiling=tiling))
            bwd = jax.jit(lambda x, c, w, seg, dy, tiling=tiling, block=block: gpu.conv_silu_bwd(
                x, None, c, w, seg, block, jnp.split(dy, split_at, axis=-1), heads, split_at,
                tiling=tiling))
            row[f"{name}_fwd_kernel"] = timeit(fwd, x, handoff, weight, segment_ids)
            row[f"{name}_bwd_kernels"] = timeit(bwd, x, handoff, weight, segment_ids, x)
    row.update(bench_pair(x, clean, weight, segment_ids, block_size, heads, split_at))
    return row


def bench_pair(noisy: jax.Array, clean: jax.Array, weight: jax.Array, segment_ids: jax.Array,
               block_size: int, norm: reference.HeadNorm | None, split_at: tuple[int, ...]) -> dict:
    """Both FLARE streams' convs, forward + backward: as one op over the packed row
    (``causal_conv_silu_pair``: the halves read in place, the clean half's gradient summed in its
    kernel, the row's gradient one array) against our two calls on the two streams (the clean
    stream's two gradients added by XLA) and autodiff of the reference; ms and the largest
    gradient difference (of the row: the two streams' gradients side by side) to autodiff."""
    kw = dict(norm=norm, split_at=split_at or None)

    def loss(outs) -> jax.Array:
        return sum(jnp.sum(part.astype(jnp.float32) ** 2) for part in jax.tree.leaves(outs))

    def pair(row):
        return loss(causal_conv_silu_pair(row, weight, segment_ids, block_size=block_size,
                                          backend="gpu", **kw))

    def two_calls(backend):
        def fn(c, x):
            return loss((causal_conv_silu(c, weight, segment_ids, backend=backend, **kw),
                         causal_conv_silu(x, weight, segment_ids, clean=c, block_size=block_size,
                                          backend=backend, **kw)))
        return fn

    row = jnp.concatenate([clean, noisy], axis=1)
    pair_grad = jax.jit(jax.grad(pair))
    result = {"pair_pair_fwd_bwd": timeit(pair_grad, row)}
    grads = {"pair": pair_grad(row)}
    for name, backend in (("two_calls", "gpu"), ("autodiff", "reference")):
        grad = jax.jit(jax.grad(two_calls(backend), (0, 1)))
        result[f"pair_{name}_fwd_bwd"] = timeit(grad, clean, noisy)
        grads[name] = jnp.concatenate(grad(clean, noisy), axis=1)
    want = grads["autodiff"].astype(jnp.float32)
    for name in ("pair", "two_calls"):
        result[f"pair_{name}_max_rel_grad_diff"] = float(
            jnp.max(jnp.abs(grads[name].astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    result["pair_two_calls_over_pair_fwd_bwd"] = (result["pair_two_calls_fwd_bwd"]
                                                  / result["pair_pair_fwd_bwd"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=6144)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--sweep", action="store_true", help="time our kernels at every tiling")
    parser.add_argument("--norm", action="store_true",
                        help="our kernels as the model calls them: normalised q, k heads, 3 parts")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = bench(args.batch, args.tokens, args.channels, args.block_size, args.sweep, args.norm)
    row["device"] = jax.devices()[0].device_kind
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
