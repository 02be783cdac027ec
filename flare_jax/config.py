"""Model configuration, read from a Hugging Face ``config.json`` and validated."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"

# Text model_type values: Qwen3.5 dense, Qwen3.5-MoE and Qwen3-Next (both with sparse experts).
QWEN3_5 = "qwen3_5_text"
QWEN3_5_MOE = "qwen3_5_moe_text"
QWEN3_NEXT = "qwen3_next"
TEXT_MODEL_TYPES = (QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT)
# Vision-language wrappers (text settings under ``text_config``) -> their text model_type.
WRAPPER_MODEL_TYPES = {"qwen3_5": QWEN3_5, "qwen3_5_moe": QWEN3_5_MOE}
# HF defaults of the expert settings per family (Qwen3.5-MoE always renormalises the top-k
# weights and puts experts in every layer, so it has no norm_topk_prob / sparse-step fields).
_MOE_DEFAULTS = {
    QWEN3_NEXT: dict(num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                     shared_expert_intermediate_size=512),
    QWEN3_5_MOE: dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                      shared_expert_intermediate_size=512),
}


class ConfigError(ValueError):
    """A config file or field holds a value the framework cannot use."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Qwen3.5-style hybrid LM (the text part only).

    ``num_experts > 0`` makes the MLP of the layers selected by :meth:`is_moe_layer` a sparse
    mixture of experts (top-``num_experts_per_tok`` routed SwiGLU experts of width
    ``moe_intermediate_size`` plus a sigmoid-gated shared expert); other layers keep the dense
    SwiGLU of width ``intermediate_size`` (0 when every layer is sparse).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # FLARE: id of the mask token of the noisy stream (None: not yet chosen; training requires it).
    mask_token_id: int | None = None
    # The HF text model_type this config came from (selects key names and export class).
    model_type: str = QWEN3_5
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' is {self.model_type!r}; expected one of "
                              f"{list(TEXT_MODEL_TYPES)}")
        self._check_mlp()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field 'layer_types' has {len(self.layer_types)} entries but "
                f"'num_hidden_layers' is {self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (LINEAR, FULL)})
        if bad:
            raise ConfigError(f"config field 'layer_types' holds unknown types {bad}; "
                              f"expected '{LINEAR}' or '{FULL}'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config field 'num_attention_heads' must be a multiple of "
                              "'num_key_value_heads'")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError("config field 'linear_num_value_heads' must be a multiple of "
                              "'linear_num_key_heads'")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) "
                              f"gives rotary dim {self.rotary_dim}, expected an even number in "
                              f"(0, head_dim={self.head_dim}]")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"config field 'mask_token_id' ({self.mask_token_id}) is outside "
                              f"[0, vocab_size={self.vocab_size})")

    def _check_mlp(self) -> None:
        for name in ("intermediate_size", "num_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"config field '{name}' must be a non-negative integer, "
                                  f"got {value!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step <= 0:
            raise ConfigError("config field 'decoder_sparse_step' must be a positive integer, got "
                              f"{self.decoder_sparse_step!r}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"config field 'mlp_only_layers' holds {bad}, outside "
                              f"[0, num_hidden_layers={self.num_hidden_layers})")
        if self.model_type == QWEN3_5 and self.num_experts:
            raise ConfigError(f"model_type '{QWEN3_5}' is dense but 'num_experts' is "
                              f"{self.num_experts}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"config field 'num_experts_per_tok' ({self.num_experts_per_tok})"
                                  f" must be in [1, num_experts={self.num_experts}]")
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"config field '{name}' must be positive with experts")
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            raise ConfigError("config field 'intermediate_size' must be positive: some layers use "
                              "the dense MLP")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` uses the sparse MoE MLP (HF's rule: experts exist, the layer is
        not in ``mlp_only_layers`` and ``index + 1`` is a multiple of ``decoder_sparse_step``)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return tuple(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an HF config dict (text or vision-language layout); errors name ``source``."""
        model_type = hf.get("model_type")
        if model_type in WRAPPER_MODEL_TYPES:
            if "text_config" not in hf:
                raise ConfigError(f"{source}: model_type '{model_type}' needs a 'text_config' entry")
            text = dict(hf["text_config"])
            text_type = WRAPPER_MODEL_TYPES[model_type]
            if text.get("model_type", text_type) != text_type:
                raise ConfigError(f"{source}: text_config.model_type is {text['model_type']!r}; "
                                  f"model_type '{model_type}' expects '{text_type}'")
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
            for key in ("eos_token_id", "pad_token_id"):
                if text.get(key) is None and hf.get(key) is not None:
                    text[key] = hf[key]
        elif model_type in TEXT_MODEL_TYPES:
            text, text_type = dict(hf), model_type
        else:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; expected one of "
                f"{list(TEXT_MODEL_TYPES) + list(WRAPPER_MODEL_TYPES)}")
        return cls._from_text_dict(text, source, text_type)

    @classmethod
    def _from_text_dict(cls, text: Mapping[str, Any], source: str,
                        model_type: str) -> ModelConfig:
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"]
        if model_type != QWEN3_5_MOE:  # Qwen3.5-MoE has experts in every layer, no dense MLP
            required.append("intermediate_size")
        missing = [k for k in required if k not in text]
        if missing:
            raise ConfigError(f"{source}: missing required fields {missing}")
        if text.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {text['hidden_act']!r}; "
                              "only 'silu' is supported")
        if text.get("attention_bias", False):
            raise ConfigError(f"{source}: field 'attention_bias' is true; only bias-free "
                              "attention projections are supported")
        rope = dict(text.get("rope_parameters") or {})
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is "
                              "not supported (expected 'default')")
        n_layers = text["num_hidden_layers"]
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = text.get("full_attention_interval", 4)
            layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
        eos = text.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        try:
            return cls(
                vocab_size=text["vocab_size"],
                hidden_size=text["hidden_size"],
                intermediate_size=text.get("intermediate_size", 0),
                num_hidden_layers=n_layers,
                num_attention_heads=text["num_attention_heads"],
                num_key_value_heads=text["num_key_value_heads"],
                head_dim=head_dim,
                linear_num_key_heads=text.get("linear_num_key_heads", 16),
                linear_num_value_heads=text.get("linear_num_value_heads", 32),
                linear_key_head_dim=text.get("linear_key_head_dim", 128),
                linear_value_head_dim=text.get("linear_value_head_dim", 128),
                linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
                layer_types=tuple(layer_types),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
                partial_rotary_factor=float(
                    rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
                tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
                max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
                eos_token_id=eos_ids,
                pad_token_id=text.get("pad_token_id"),
                mask_token_id=text.get("mask_token_id"),
                model_type=model_type,
                **_moe_fields(text, model_type),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ModelConfig:
        """Read an HF ``config.json``."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (the form stored in flare-jax checkpoints)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}")
        values = dict(data)
        values["layer_types"] = tuple(values["layer_types"])
        values["eos_token_id"] = tuple(values.get("eos_token_id", ()))
        values["mlp_only_layers"] = tuple(values.get("mlp_only_layers", ()))
        return cls(**values)


def _moe_fields(text: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The expert settings of an HF text config (HF defaults where absent; none for dense)."""
    if model_type not in _MOE_DEFAULTS:
        return {}
    fields = {k: text.get(k, v) for k, v in _MOE_DEFAULTS[model_type].items()}
    if model_type == QWEN3_NEXT:
        fields["norm_topk_prob"] = bool(text.get("norm_topk_prob", True))
        fields["decoder_sparse_step"] = text.get("decoder_sparse_step", 1)
        fields["mlp_only_layers"] = tuple(text.get("mlp_only_layers") or ())
    return fields
