"""Synthetic HF checkpoints made in code: random Qwen3.5-family weights in the HF safetensors layout and a
small character-level tokenizer. Used by the demo, the conversion memory benchmark and tests; nothing
is downloaded."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import tokenizers

from flare_jax.config import ModelConfig
from flare_jax.convert.jax_to_hf import text_hf_config
from flare_jax.convert.keymap import HFTensor, expected_maps, hf_tensors
from flare_jax.convert.safetensors_io import write_sharded

SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>", "<|im_start|>", "<|im_end|>")


def _init(spec: HFTensor, rng: np.random.Generator) -> np.ndarray:
    """HF-style initialisation: N(0, 0.02) weights, zero (1 + w) norms, unit gated norm."""
    leaf = spec.name.rsplit(".", 2)
    if spec.name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 16.0, spec.shape))
    if spec.name.endswith("dt_bias") or spec.name.endswith("linear_attn.norm.weight"):
        return np.ones(spec.shape)
    if "norm" in leaf[-2]:
        return np.zeros(spec.shape)
    if spec.name.endswith("conv1d.weight"):
        bound = 1.0 / np.sqrt(spec.shape[-1])
        return rng.uniform(-bound, bound, spec.shape)
    return rng.normal(0.0, 0.02, spec.shape)


def write_random_checkpoint(directory: str | Path, config: ModelConfig, *, seed: int = 0,
                            dtype: str = "bfloat16", max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write random weights for ``config`` as HF safetensors shards plus ``config.json``."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for spec in hf_tensors(expected_maps(config)):
            value = _init(spec, rng)
            keep_fp32 = spec.name.endswith(("A_log", "dt_bias"))
            yield spec.name, value.astype(np.float32 if keep_fp32 else np_dtype)

    write_sharded(directory, tensors(), max_shard_bytes=max_shard_bytes)
    hf_config = text_hf_config(None, config)
    hf_config["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


def write_char_tokenizer(directory: str | Path, alphabet: Sequence[str]) -> tokenizers.Tokenizer:
    """A character-level tokenizer (special tokens first, then ``alphabet``) saved as
    ``tokenizer.json`` + ``tokenizer_config.json`` in ``directory``."""
    directory = Path(directory)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(alphabet)])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = tokenizers.decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eos>", "pad_token": "<pad>", "mask_token": "<mask>"}, indent=2) + "\n")
    return tokenizer
