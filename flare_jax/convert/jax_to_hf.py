"""flare-jax checkpoint -> HF safetensors checkpoint in the text-only ``Qwen3_5ForCausalLM`` layout."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flare_jax.checkpoint import (
    HF_CONFIG_FILE,
    PARAMS_DIR,
    CheckpointError,
    atomic_directory,
    copy_tokenizer_files,
    flatten,
    load_param_group,
    param_group,
    param_group_names,
    read_model_config,
)
from flare_jax.config import ModelConfig
from flare_jax.convert.keymap import expected_tensors, to_hf
from flare_jax.convert.safetensors_io import write_sharded

DEFAULT_SHARD_BYTES = 5 * 1024**3


def text_hf_config(hf_config: dict | None, config: ModelConfig) -> dict:
    """The HF config of the exported text-only model (vision settings dropped)."""
    if hf_config is None:
        text = {k: v for k, v in config.to_dict().items()
                if k not in ("rope_theta", "partial_rotary_factor", "mask_token_id")}
        text["layer_types"] = list(config.layer_types)
        text["eos_token_id"] = list(config.eos_token_id) or None
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta,
                                   "partial_rotary_factor": config.partial_rotary_factor}
    elif "text_config" in hf_config:
        text = dict(hf_config["text_config"])
        text.setdefault("tie_word_embeddings", hf_config.get("tie_word_embeddings", False))
    else:
        text = dict(hf_config)
    text["model_type"] = "qwen3_5_text"
    text["architectures"] = ["Qwen3_5ForCausalLM"]
    return text


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False) -> Path:
    """Write a flare-jax checkpoint back as HF safetensors shards + config + tokenizer files."""
    ckpt_dir = Path(ckpt_dir)
    config = read_model_config(ckpt_dir)
    hf_config_path = ckpt_dir / HF_CONFIG_FILE
    hf_config = json.loads(hf_config_path.read_text()) if hf_config_path.is_file() else None
    params_dir = ckpt_dir / PARAMS_DIR
    stored = set(param_group_names(params_dir))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        """Load one parameter group at a time and yield its tensors in HF layout."""
        for name, group in itertools.groupby(expected_tensors(config),
                                             key=lambda spec: param_group(spec.path)):
            if name not in stored:
                raise CheckpointError(f"{params_dir}: parameter group '{name}' is missing")
            flat = flatten(load_param_group(params_dir, name))
            for spec in group:
                yield spec.hf_name, to_hf(spec, np.asarray(flat.pop(spec.path)))

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_sharded(tmp, tensors(), max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(
            json.dumps(text_hf_config(hf_config, config), indent=2) + "\n")
        copy_tokenizer_files(ckpt_dir, tmp)
    return Path(out_dir)
