"""The Gated DeltaNet's causal depthwise conv + SiLU on one GPU: ours with the Pallas backward
(``backend="gpu"``), autodiff of the same jnp forward (``backend="reference"``, what XLA fuses on
its own), and XLA's depthwise ``conv_general_dilated`` + SiLU (one document, no handoff) on the
same bf16 inputs; plain (four documents per row) and FLARE handoff (block 32). Shape defaults to
one stream of a Qwen3.5-0.8B linear layer in the train-step benchmark (4096 tokens, conv dim
6144, kernel 4). Milliseconds, median of 20 after a warm-up; also the largest gradient difference
between ours and autodiff, and our backward kernels alone in one pass and in two
(``gpu.conv_silu_bwd(passes=...)``; the model takes two).

    python benchmarks/conv.py [--tokens 4096] [--channels 6144] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from block_attention import timed

from pallas_kernels.causal_conv import causal_conv_silu, gpu
from pallas_kernels.causal_conv.api import pad_inputs

KERNEL = 4


def xla_conv_silu(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Depthwise causal conv by ``conv_general_dilated`` (left padding K-1), SiLU in fp32."""
    out = jax.lax.conv_general_dilated(
        x, weight[:, None, :].astype(x.dtype), window_strides=(1,), padding=[(KERNEL - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=x.shape[-1],
        preferred_element_type=jnp.float32)
    return jax.nn.silu(out).astype(x.dtype)


def gradients(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), (0, 1)))


def bench(tokens: int, channels: int, block_size: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (1, tokens, channels), jnp.bfloat16)
    clean = jax.random.normal(keys[1], (1, tokens, channels), jnp.bfloat16)
    weight = jax.random.normal(keys[2], (KERNEL, channels), jnp.float32) * 0.5
    segment_ids = (jnp.arange(tokens) // 1024)[None].astype(jnp.int32)  # four documents
    row = dict(tokens=tokens, channels=channels, block_size=block_size)
    for mode in ("plain", "handoff"):
        def conv(backend, mode=mode):
            if mode == "plain":
                return lambda x, w: causal_conv_silu(x, w, segment_ids, backend=backend)
            return lambda x, c: causal_conv_silu(x, weight, segment_ids, clean=c,
                                                 block_size=block_size, backend=backend)

        second = weight if mode == "plain" else clean
        peers = [("ours", conv("gpu")), ("autodiff", conv("reference"))]
        if mode == "plain":
            peers.append(("xla_conv", xla_conv_silu))
        for name, fn in peers:
            row[f"{mode}_{name}_fwd"] = timed(jax.jit(fn), x, second, iters=20)
            row[f"{mode}_{name}_fwd_bwd"] = timed(gradients(fn), x, second, iters=20)
        ours, auto = gradients(peers[0][1])(x, second), gradients(peers[1][1])(x, second)
        row[f"{mode}_max_rel_grad_diff"] = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(ours, auto, strict=True))
        row[f"{mode}_autodiff_over_ours_fwd_bwd"] = (row[f"{mode}_autodiff_fwd_bwd"]
                                                     / row[f"{mode}_ours_fwd_bwd"])
        handoff = None if mode == "plain" else clean
        padded_x, padded_clean, padded_seg = pad_inputs(x, segment_ids, KERNEL, clean=handoff)
        bwd_block = None if handoff is None else block_size
        for passes in (1, 2):
            kernels = jax.jit(lambda px, pc, w, seg, dy, passes=passes, block=bwd_block:
                              gpu.conv_silu_bwd(px, pc, w, seg, block, dy, passes=passes))
            row[f"{mode}_bwd_kernels_{passes}_pass"] = timed(
                kernels, padded_x, padded_clean, weight, padded_seg, x, iters=20)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=6144)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = bench(args.tokens, args.channels, args.block_size)
    row["device"] = jax.devices()[0].device_kind
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
