"""FLARE conversion of Qwen3.5-2B (text part; shape as in its HF config.json, see
docs/performance.md for which fields were confirmed)."""

import ml_collections
from _qwen3_5 import qwen3_5_config


def get_config() -> ml_collections.ConfigDict:
    return qwen3_5_config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                          num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16,
                          tie_word_embeddings=True)
