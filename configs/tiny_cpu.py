"""A tiny hybrid model (one Gated DeltaNet and one gated attention layer), random init, CPU.

Point it at a corpus and a tokenizer directory:
  flare train --config configs/tiny_cpu.py --config.workdir=runs/tiny \
      --config.data.paths="('corpus.jsonl',)" --config.data.tokenizer_dir=path/to/tokenizer
The vocabulary must cover the tokenizer (``model.hf_config.vocab_size``) and
``model.mask_token_id`` must name its mask token.
"""

import ml_collections

from flare_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.workdir = "runs/tiny_cpu"
    c.block_size = 4
    c.model.hf_config = ml_collections.ConfigDict(dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        full_attention_interval=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, max_position_embeddings=512))
    c.model.mask_token_id = 2
    c.model.dtype = "float32"
    c.model.scan_layers = False  # two layers: no group repeats, the unrolled loop is the program
    c.data.paths = ("corpus.jsonl",)
    c.data.seq_len = 32
    c.data.global_batch_size = 4
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 2
    c.optimizer.weight_decay = 0.0
    c.train.steps = 20
    c.train.log_every = 1
    c.checkpoint.every = 10
    c.checkpoint.keep = 2
    return c
