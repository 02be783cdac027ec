"""Names and layouts of Qwen3.5 HF tensors <-> flare-jax parameters.

Parameters are addressed by tuples of strings (the checkpoint's nested-dict keys). HF linear weights
are ``[out, in]``; ours are ``kernel [in, out]``. The conv weight ``[C, 1, K]`` is ours ``[K, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flare_jax.config import FULL, ModelConfig

VLM_TEXT_PREFIX = "model.language_model."
# Weights that are not part of the text model: the vision tower and multi-token-prediction heads.
SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")

Path = tuple[str, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One parameter: its path, its HF name (text-only layout) and its shape in HF layout."""

    path: Path
    hf_name: str
    hf_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        leaf = self.path[-1]
        if leaf == "kernel":
            return "dense"
        if leaf == "conv_weight":
            return "conv"
        return "plain"


def expected_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Every text tensor the config implies, in checkpoint order."""
    c = config
    specs = [TensorSpec(("embed_tokens",), "model.embed_tokens.weight",
                        (c.vocab_size, c.hidden_size))]

    def dense(prefix: Path, name: str, out_f: int, in_f: int) -> TensorSpec:
        return TensorSpec((*prefix, name, "kernel"), f"{_hf_layer(prefix)}{name}.weight",
                          (out_f, in_f))

    def vector(prefix: Path, name: str, size: int) -> TensorSpec:
        return TensorSpec((*prefix, name, "weight"), f"{_hf_layer(prefix)}{name}.weight", (size,))

    for i, layer_type in enumerate(c.layer_types):
        layer: Path = ("layers", str(i))
        specs += [vector(layer, "input_layernorm", c.hidden_size),
                  vector(layer, "post_attention_layernorm", c.hidden_size)]
        if layer_type == FULL:
            attn = (*layer, "self_attn")
            qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            specs += [dense(attn, "q_proj", 2 * qd, c.hidden_size),
                      dense(attn, "k_proj", kvd, c.hidden_size),
                      dense(attn, "v_proj", kvd, c.hidden_size),
                      dense(attn, "o_proj", c.hidden_size, qd),
                      vector(attn, "q_norm", c.head_dim), vector(attn, "k_norm", c.head_dim)]
        else:
            lin = (*layer, "linear_attn")
            hv = c.linear_num_value_heads
            specs += [dense(lin, "in_proj_qkv", c.linear_conv_dim, c.hidden_size),
                      dense(lin, "in_proj_z", c.linear_value_dim, c.hidden_size),
                      dense(lin, "in_proj_b", hv, c.hidden_size),
                      dense(lin, "in_proj_a", hv, c.hidden_size),
                      TensorSpec((*lin, "conv_weight"), f"{_hf_layer(lin)}conv1d.weight",
                                 (c.linear_conv_dim, 1, c.linear_conv_kernel_dim)),
                      TensorSpec((*lin, "dt_bias"), f"{_hf_layer(lin)}dt_bias", (hv,)),
                      TensorSpec((*lin, "A_log"), f"{_hf_layer(lin)}A_log", (hv,)),
                      vector(lin, "norm", c.linear_value_head_dim),
                      dense(lin, "out_proj", c.hidden_size, c.linear_value_dim)]
        mlp = (*layer, "mlp")
        specs += [dense(mlp, "gate_proj", c.intermediate_size, c.hidden_size),
                  dense(mlp, "up_proj", c.intermediate_size, c.hidden_size),
                  dense(mlp, "down_proj", c.hidden_size, c.intermediate_size)]
    specs.append(vector((), "norm", c.hidden_size))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head", "kernel"), "lm_head.weight",
                                (c.vocab_size, c.hidden_size)))
    return specs


def _hf_layer(prefix: Path) -> str:
    return "model." + "".join(f"{p}." for p in prefix)


def to_ours(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """HF layout -> flare-jax layout (a new contiguous array where the layout differs)."""
    if spec.kind == "dense":
        return np.ascontiguousarray(array.T)
    if spec.kind == "conv":
        return np.ascontiguousarray(array[:, 0, :].T)
    return array


def to_hf(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """flare-jax layout -> HF layout."""
    if spec.kind == "dense":
        return np.ascontiguousarray(array.T)
    if spec.kind == "conv":
        return np.ascontiguousarray(array.T[:, None, :])
    return array


def text_layout_name(hf_name: str) -> str:
    """Name of a tensor in the text-only layout (``model.language_model.X`` -> ``model.X``)."""
    if hf_name.startswith(VLM_TEXT_PREFIX):
        return "model." + hf_name[len(VLM_TEXT_PREFIX):]
    return hf_name
