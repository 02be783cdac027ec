"""FLARE conversion of Qwen3.5-9B (text part; shape as in its HF config.json, see
docs/performance.md for which fields were confirmed)."""

import ml_collections
from _qwen3_5 import qwen3_5_config


def get_config() -> ml_collections.ConfigDict:
    return qwen3_5_config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                          num_attention_heads=16, num_key_value_heads=4, linear_num_value_heads=32,
                          tie_word_embeddings=False)
