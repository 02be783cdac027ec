"""FLARE conversion of Qwen3.5-0.8B (text part; shape as in its HF config.json, see
docs/performance.md for which fields were confirmed)."""

import ml_collections
from _qwen3_5 import qwen3_5_config


def get_config() -> ml_collections.ConfigDict:
    c = qwen3_5_config(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                       num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16,
                       tie_word_embeddings=True)
    # Keeps matmul and kernel outputs: 10% faster steps than "full" on the H200, about 16 GiB of
    # saved activations per 4096-token row (docs/performance.md, "Selective remat").
    # "selective_inputs" (also every projection's input) is 4.5 ms (1.0%) faster per FLARE step on
    # the H200 but takes 11.25 GiB more at batch 4 (70.4 GiB in all): out of memory on an 80 GB
    # H100 at the default memory fraction of 0.9, 1.9 ms faster at 0.95. Keeping only the norm
    # outputs or only the SwiGLU activation was no faster on the H100 (docs/performance.md,
    # "The configured step on the H100").
    c.model.remat = "selective"
    # Unrolled layers: 8.5% faster steps on the H200 (302.7 vs 330.9 ms, FLARE batch 2) and 7 GiB
    # less temp memory; the scanned stack's loop copies its carries (a 13 ms memcpy per step).
    # Compiles in 70 s instead of 37 s (docs/performance.md, "Unrolled layers").
    c.model.scan_layers = False
    # The head's cross-entropy over steps of 4096 tokens, gradients formed in the forward pass:
    # 281.0 vs 301.5 ms per FLARE step at batch 2, 4.4 GiB more temp memory.
    c.train.token_chunk = 4096
    # Its logits stored in bf16 (fp32 accumulation, fp32 softmax): 6-8 ms (1.4-1.7%) faster steps on
    # the H200, the first losses within 1.1e-4 of fp32 logits' (docs/performance.md, "On the H100;
    # the head's logsumexp kernel and bf16 logits").
    c.train.logits_dtype = "bfloat16"
    # Micro-batches of 4 rows per device train fastest that fit an 80 GB part: 469.0 ms per FLARE
    # step (34.6% MFU, 59.2 GiB) on the H100, 437.9 ms (37.1%) on the H200 (5 rows: no faster on
    # the H200, out of memory on the H100); set train.grad_accum so that
    # global_batch_size / (grad_accum * data devices) is 4 (docs/performance.md, "Batch 4" and,
    # for these figures, "The configured step on the H100").
    return c
