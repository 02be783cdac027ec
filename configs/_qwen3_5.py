"""Shared settings of the Qwen3.5 conversion configs (imported by ``qwen3_5_*.py``)."""

import ml_collections

from flare_jax.train.config import default_config

# Fields common to the Qwen3.5 dense text configs (vocabulary, norms, RoPE, Gated DeltaNet dims).
COMMON = dict(vocab_size=248320, rms_norm_eps=1e-6, full_attention_interval=4, head_dim=256,
              linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
              linear_conv_kernel_dim=4, max_position_embeddings=262144,
              rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0,
                                   partial_rotary_factor=0.25),
              eos_token_id=248044)


def qwen3_5_config(**shape) -> ml_collections.ConfigDict:
    """FLARE conversion of a Qwen3.5 checkpoint: ``model.init_from`` must name a converted
    flare-jax checkpoint (``flare convert hf-to-jax``); ``model.hf_config`` (the same shape) is
    used for random-init runs such as benchmarks. Set ``model.mask_token_id`` to a reserved
    token of the tokenizer and ``data.paths`` to the corpus."""
    c = default_config()
    c.model.hf_config = ml_collections.ConfigDict({**COMMON, **shape})
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # "selective" is faster where its saved activations fit (0.8B)
    c.model.scan_layers = True  # 24-32 layers: compile one [linear x3, full] group, not each layer
    c.block_size = 32
    c.data.seq_len = 4096
    c.data.global_batch_size = 64
    c.data.read_threads = 4
    c.data.prefetch = 2
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.01
    c.train.steps = 10_000
    c.train.log_every = 10
    c.checkpoint.every = 500
    return c
