"""HF safetensors checkpoint -> flare-jax checkpoint (Orbax params + configs + tokenizer)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from flare_jax.checkpoint import (
    PARAMS_DIR,
    atomic_directory,
    copy_tokenizer_files,
    nest,
    save_param_groups,
    write_model_config,
)
from flare_jax.config import ModelConfig
from flare_jax.convert.keymap import (
    SKIPPED_PREFIXES,
    expected_maps,
    hf_tensors,
    text_layout_name,
    to_ours,
)
from flare_jax.convert.safetensors_io import index_checkpoint, read_tensor

log = logging.getLogger(__name__)
DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")


class ConversionError(ValueError):
    """The source checkpoint does not match what its config implies."""


FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                np.dtype(ml_dtypes.bfloat16)}


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast floating tensors to ``dtype`` ("auto": leave as stored)."""
    if dtype == "auto" or array.dtype not in FLOAT_DTYPES:
        return array
    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return array if array.dtype == target else array.astype(target)


def convert_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "auto", *,
               overwrite: bool = False) -> Path:
    """Convert an HF Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoint (text or vision-language
    layout) to a flare-jax checkpoint.

    Tensors are streamed one at a time; ``dtype`` "auto" keeps each tensor's stored dtype (a round
    trip back to HF is then bit-identical), otherwise floating tensors are cast. Vision-tower and
    MTP weights are skipped (and logged). The output directory appears only when complete.
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: HF checkpoint directory not found")
    config_path = hf_dir / "config.json"
    config = ModelConfig.from_hf_file(config_path)
    hf_config = json.loads(config_path.read_text())
    entries = index_checkpoint(hf_dir)

    by_text_name = {}
    skipped = []
    for name, entry in entries.items():
        if name.startswith(SKIPPED_PREFIXES):
            skipped.append(name)
        else:
            by_text_name[text_layout_name(name)] = (name, entry)
    if skipped:
        log.info("skipping %d non-text tensors (vision tower / MTP), e.g. %s", len(skipped),
                 skipped[0])
    maps = expected_maps(config)
    specs = hf_tensors(maps)
    expected_names = {s.name for s in specs}
    problems = []
    missing = [s.name for s in specs if s.name not in by_text_name]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    tied_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(set(by_text_name) - expected_names - tied_extra)
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    for spec in specs:
        if spec.name in by_text_name:
            name, entry = by_text_name[spec.name]
            if entry.shape != spec.shape:
                problems.append(f"tensor '{name}' in {entry.file.name} has shape {entry.shape}, "
                                f"config implies {spec.shape}")
    if problems:
        raise ConversionError(f"{hf_dir} does not match {config_path.name}: " + "; ".join(problems))

    def groups() -> Iterator[tuple[str, dict]]:
        """Read and convert one parameter group at a time (maps come in group order)."""
        for name, group in itertools.groupby(maps, key=lambda m: m.group):
            flat = {}
            for m in group:
                arrays = to_ours(m, [read_tensor(by_text_name[t.name][1]) for t in m.hf])
                flat.update((path, _cast(a, dtype)) for path, a in zip(m.paths, arrays, strict=True))
            yield name, nest(flat)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_param_groups(tmp / PARAMS_DIR, groups())
        write_model_config(tmp, config, hf_config)
        copy_tokenizer_files(hf_dir, tmp)
    return Path(out_dir)

