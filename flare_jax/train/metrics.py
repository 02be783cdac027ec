"""Training metrics: model FLOPs (both FLARE streams), MFU, throughput, a JSONL log and a
progress bar.

FLOPs are the model's training FLOPs (forward + backward = 3x forward; recomputation is not
counted): ``2 * params_matmul`` per token of every stream processed, plus attention scores and
values over the visible key pairs of each full-attention layer, plus the Gated DeltaNet
recurrence (``6 d_k d_v`` per value head and token: decay/update, read-out and state write) and
the depthwise conv. A mixture-of-experts layer counts its active weights only: the router, the
top-k routed experts, the shared expert and its gate. Visible pairs assume one document per row
(an upper bound for packed rows): causal ``L (L + 1) / 2`` for the clean stream; a noisy token of
block ``b`` sees ``b * bs`` clean and ``bs`` noisy tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax

from flare_jax.config import FULL, ModelConfig

# Dense bf16 peak FLOP/s per device, by device kind substring.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v6": 918e12, "TPU v4": 275e12}


def mlp_params(config: ModelConfig, index: int) -> int:
    """Weights of layer ``index``'s MLP that one token multiplies: the dense SwiGLU, or (sparse
    layer) the router, ``num_experts_per_tok`` routed experts, the shared expert and its gate."""
    c = config
    h = c.hidden_size
    if not c.is_moe_layer(index):
        return 3 * h * c.intermediate_size
    routed = c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
    return h * c.num_experts + routed + 3 * h * c.shared_expert_intermediate_size + h


def matmul_params(config: ModelConfig) -> int:
    """Weights used in matmuls per token (projections, MLP, LM head; not the embedding gather);
    active weights only in mixture-of-experts layers."""
    c = config
    h = c.hidden_size
    full = h * (2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim) \
        + c.num_attention_heads * c.head_dim * h
    linear = h * (c.linear_conv_dim + c.linear_value_dim + 2 * c.linear_num_value_heads) \
        + c.linear_value_dim * h
    layers = sum(mlp_params(c, i) + (full if t == FULL else linear)
                 for i, t in enumerate(c.layer_types))
    return layers + h * c.vocab_size


def visible_pairs(seq_len: int, block_size: int, flare: bool) -> int:
    """Query-key pairs one full-attention head computes over a row of ``seq_len`` tokens."""
    causal = seq_len * (seq_len + 1) // 2
    if not flare:
        return causal
    blocks = -(-seq_len // block_size)
    noisy = 0
    for b in range(blocks):
        width = min(block_size, seq_len - b * block_size)
        noisy += width * (b * block_size + width)
    return causal + noisy


def train_flops_per_row(config: ModelConfig, seq_len: int, block_size: int, flare: bool) -> float:
    """Training FLOPs (3x forward) of one row of ``seq_len`` tokens (two streams with FLARE)."""
    c = config
    streams = 2 if flare else 1
    tokens = streams * seq_len
    forward = 2.0 * matmul_params(c) * tokens
    n_full = sum(t == FULL for t in c.layer_types)
    n_linear = len(c.layer_types) - n_full
    forward += n_full * 4.0 * c.num_attention_heads * c.head_dim * visible_pairs(
        seq_len, block_size, flare)
    per_token_linear = 6.0 * c.linear_num_value_heads * c.linear_key_head_dim \
        * c.linear_value_head_dim + 2.0 * c.linear_conv_kernel_dim * c.linear_conv_dim
    forward += n_linear * per_token_linear * tokens
    return 3.0 * forward


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device (``override_tflops`` wins), None if unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for kind, flops in PEAK_FLOPS.items():
        if kind in device.device_kind:
            return flops
    return None


class MetricsLogger:
    """Per-step records (losses, token counts, step time, tokens/s, MFU) to a JSONL file and a
    progress bar on stderr; only process 0 writes."""

    def __init__(self, path: str | Path | None, *, total_steps: int, start_step: int,
                 flops_per_step: float, tokens_per_step: int, peak: float | None,
                 progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.flops_per_step = flops_per_step
        self.tokens_per_step = tokens_per_step
        self.peak_total = None if peak is None else peak * jax.device_count()
        self.total_steps = total_steps
        self.progress = progress and self.enabled
        self._file = None
        if self.enabled and path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")  # noqa: SIM115 (kept open for the run)
        self._last = time.perf_counter()
        self._last_step = start_step

    def record(self, step: int, metrics: dict[str, Any], lr: float) -> dict[str, Any]:
        """Log the metrics of ``step`` (host values); timing covers the steps since the last call
        (the first call's includes compilation)."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        step_time = (now - self._last) / steps
        self._last, self._last_step = now, step
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}, "lr": float(lr),
               "step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time}
        if self.peak_total is not None:
            row["mfu"] = self.flops_per_step / step_time / self.peak_total
        if self.enabled:
            if self._file is not None:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
            if self.progress:
                self._bar(row)
        return row

    def _bar(self, row: dict[str, Any]) -> None:
        done = row["step"] / self.total_steps
        bar = "#" * int(30 * done)
        mfu = f" mfu {100 * row['mfu']:.1f}%" if "mfu" in row else ""
        router = f"router {row['router_aux_loss']:.4f} " if "router_aux_loss" in row else ""
        sys.stderr.write(f"\r[{bar:<30}] {row['step']}/{self.total_steps} loss {row['loss']:.4f} "
                         f"ar {row['ar_loss']:.4f} diff {row['diffusion_loss']:.4f} {router}"
                         f"{row['tokens_per_s']:.0f} tok/s{mfu}")
        if row["step"] >= self.total_steps:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
