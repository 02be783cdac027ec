"""Model configuration, read from a Hugging Face ``config.json`` and validated."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"

# model_type values of the Qwen3.5 dense family: the text-only class and the vision-language wrapper
# whose text settings sit under ``text_config``.
TEXT_MODEL_TYPES = ("qwen3_5_text",)
WRAPPER_MODEL_TYPES = ("qwen3_5",)


class ConfigError(ValueError):
    """A config file or field holds a value the framework cannot use."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Qwen3.5-style hybrid LM (the text part only)."""

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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
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
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
            for key in ("eos_token_id", "pad_token_id"):
                if text.get(key) is None and hf.get(key) is not None:
                    text[key] = hf[key]
        elif model_type in TEXT_MODEL_TYPES:
            text = dict(hf)
        else:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; expected one of "
                f"{list(TEXT_MODEL_TYPES + WRAPPER_MODEL_TYPES)}")
        return cls._from_text_dict(text, source)

    @classmethod
    def _from_text_dict(cls, text: Mapping[str, Any], source: str) -> ModelConfig:
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads")
        missing = [k for k in required if k not in text]
        if missing:
            raise ConfigError(f"{source}: missing required fields {missing}")
        if text.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {text['hidden_act']!r}; "
                              "only 'silu' is supported")
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
                intermediate_size=text["intermediate_size"],
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
        return cls(**values)
