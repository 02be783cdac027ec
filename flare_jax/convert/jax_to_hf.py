"""flare-jax checkpoint -> HF safetensors checkpoint in the text-only layout of its family
(``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM`` or ``Qwen3NextForCausalLM``)."""

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
    param_group_names,
    read_model_config,
)
from flare_jax.config import QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT, ModelConfig
from flare_jax.convert.keymap import expected_maps, to_hf
from flare_jax.convert.safetensors_io import write_sharded

DEFAULT_SHARD_BYTES = 5 * 1024**3
ARCHITECTURES = {QWEN3_5: "Qwen3_5ForCausalLM", QWEN3_5_MOE: "Qwen3_5MoeForCausalLM",
                 QWEN3_NEXT: "Qwen3NextForCausalLM"}
# Our config fields that are no HF text-config fields, and HF fields a family does not have.
_NOT_HF = ("rope_theta", "partial_rotary_factor", "mask_token_id", "model_type")
_MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
             "mlp_only_layers")
_ABSENT = {QWEN3_5: _MOE_ONLY, QWEN3_NEXT: (),
           QWEN3_5_MOE: ("intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                         "mlp_only_layers")}


def text_hf_config(hf_config: dict | None, config: ModelConfig) -> dict:
    """The HF config of the exported text-only model (vision settings dropped)."""
    if hf_config is None:
        text = {k: v for k, v in config.to_dict().items()
                if k not in _NOT_HF + _ABSENT[config.model_type]}
        text["layer_types"] = list(config.layer_types)
        if "mlp_only_layers" in text:
            text["mlp_only_layers"] = list(config.mlp_only_layers)
        text["eos_token_id"] = list(config.eos_token_id) or None
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta,
                                   "partial_rotary_factor": config.partial_rotary_factor}
    elif "text_config" in hf_config:
        text = dict(hf_config["text_config"])
        text.setdefault("tie_word_embeddings", hf_config.get("tie_word_embeddings", False))
    else:
        text = dict(hf_config)
    text["model_type"] = config.model_type
    text["architectures"] = [ARCHITECTURES[config.model_type]]
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
        for name, group in itertools.groupby(expected_maps(config), key=lambda m: m.group):
            if name not in stored:
                raise CheckpointError(f"{params_dir}: parameter group '{name}' is missing")
            flat = flatten(load_param_group(params_dir, name))
            for m in group:
                arrays = to_hf(m, [np.asarray(flat.pop(path)) for path in m.paths])
                yield from ((t.name, a) for t, a in zip(m.hf, arrays, strict=True))

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_sharded(tmp, tensors(), max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(
            json.dumps(text_hf_config(hf_config, config), indent=2) + "\n")
        copy_tokenizer_files(ckpt_dir, tmp)
    return Path(out_dir)
