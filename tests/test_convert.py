"""HF <-> flare-jax conversion: bit-identical round trips, the vision-language layout, clear errors
for bad input, and nothing half-written on failure."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flare_jax
from flare_jax.config import ConfigError
from flare_jax.convert.hf_to_jax import ConversionError
from flare_jax.convert.safetensors_io import CheckpointFileError, index_checkpoint, read_tensor


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(hf_checkpoint, tmp_path, dtype):
    _, shared = hf_checkpoint("base", seed=0)
    model = copy.deepcopy(shared).to(dtype)  # the session's shared model must stay fp32
    source = tmp_path / "hf"
    model.save_pretrained(source)
    ckpt = flare_jax.convert_hf(source, tmp_path / "ckpt")
    # Small shards: the export must split and index them.
    back = flare_jax.export_hf(ckpt, tmp_path / "back", max_shard_bytes=64 * 1024)
    original, exported = all_tensors(source), all_tensors(back)
    assert len(list(back.glob("*.safetensors"))) > 1
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # The exported directory is a loadable HF checkpoint with the same logits.
    from transformers import Qwen3_5ForCausalLM

    reloaded = Qwen3_5ForCausalLM.from_pretrained(back, dtype=dtype).eval()
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens, use_cache=False).logits,
                           model(tokens, use_cache=False).logits)


def test_dtype_cast(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("base", seed=0)
    ckpt = flare_jax.convert_hf(directory, tmp_path / "ckpt", dtype="bfloat16")
    model = flare_jax.load(ckpt)
    embed = model.module.embed_tokens[...]
    assert str(embed.dtype) == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        flare_jax.convert_hf(directory, tmp_path / "x", dtype="int8")


def test_vision_language_layout_converts_text_weights(tmp_path):
    """The released Qwen3.5 class nests text weights under model.language_model and the config
    under text_config; vision weights are skipped and the logits equal HF's text-only forward."""
    from tiny_models import TINY, build_hf_model, vlm_from_text
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    text_source = build_hf_model(seed=3)
    vlm = vlm_from_text(Qwen3_5Config, Qwen3_5ForConditionalGeneration, TINY, text_source)
    vlm.save_pretrained(tmp_path / "vlm")
    ckpt = flare_jax.convert_hf(tmp_path / "vlm", tmp_path / "ckpt")
    tokens = np.array([[4, 8, 15, 16, 23, 42, 7]])
    with torch.no_grad():
        expected = vlm(input_ids=torch.tensor(tokens), use_cache=False).logits.numpy()
    ours = flare_jax.load(ckpt).logits(tokens)
    assert np.abs(ours - expected).max() <= 1e-4  # fp32 parity tolerance, as in test_parity.py
    exported = flare_jax.export_hf(ckpt, tmp_path / "text_only")
    assert json.loads((exported / "config.json").read_text())["architectures"] == [
        "Qwen3_5ForCausalLM"]
    assert not any(k.startswith("model.visual") for k in all_tensors(exported))


def broken_copy(source, destination, *, drop=None, add=None, config_edit=None):
    """Rewrite a checkpoint with one tensor dropped/added or the config edited."""
    from flare_jax.convert.safetensors_io import write_sharded

    entries = index_checkpoint(source)
    tensors = [(n, read_tensor(e)) for n, e in entries.items() if n != drop]
    if add:
        tensors.append((add, np.zeros((2, 2), np.float32)))
    write_sharded(destination, iter(tensors), max_shard_bytes=1 << 30)
    config = json.loads((source / "config.json").read_text())
    if config_edit:
        config.update(config_edit)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("kind, match", [
    ("missing", r"missing tensors \(1\): \['model.layers.1.mlp.up_proj.weight'\]"),
    ("unexpected", r"unexpected tensors \(1\): \['model.layers.0.extra.weight'\]"),
    ("shape", r"has shape \(96, 64\), config implies \(97, 64\)"),
])
def test_key_and_shape_errors_name_the_tensor(hf_checkpoint, tmp_path, kind, match):
    directory, _ = hf_checkpoint("base", seed=0)
    kwargs = {"missing": dict(drop="model.layers.1.mlp.up_proj.weight"),
              "unexpected": dict(add="model.layers.0.extra.weight"),
              "shape": dict(config_edit={"vocab_size": 97})}[kind]
    source = broken_copy(directory, tmp_path / "bad", **kwargs)
    with pytest.raises(ConversionError, match=match):
        flare_jax.convert_hf(source, tmp_path / "out" / "ckpt")
    assert not (tmp_path / "out" / "ckpt").exists()
    assert leftovers(tmp_path / "out") == [] if (tmp_path / "out").exists() else True


def test_file_errors(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("base", seed=0)
    with pytest.raises(ConversionError, match="not found"):
        flare_jax.convert_hf(tmp_path / "nope", tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(directory / "config.json", empty / "config.json")
    with pytest.raises(CheckpointFileError, match="no model.safetensors.index.json"):
        flare_jax.convert_hf(empty, tmp_path / "o2")
    truncated = tmp_path / "truncated"
    shutil.copytree(directory, truncated)
    file = next(truncated.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match="truncated"):
        flare_jax.convert_hf(truncated, tmp_path / "o3")
    garbage = tmp_path / "garbage"
    shutil.copytree(directory, garbage)
    next(garbage.glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json{{{{{{{{")
    with pytest.raises(CheckpointFileError, match="not valid JSON"):
        flare_jax.convert_hf(garbage, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_config_errors(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("base", seed=0)
    source = tmp_path / "src"
    shutil.copytree(directory, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        flare_jax.convert_hf(source, tmp_path / "o")
    (source / "config.json").write_text(json.dumps({**config, "layer_types": ["mamba"] * 4}))
    with pytest.raises(ConfigError, match="unknown types \\['mamba'\\]"):
        flare_jax.convert_hf(source, tmp_path / "o")
    (source / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        flare_jax.convert_hf(source, tmp_path / "o")


def test_existing_destination_is_not_overwritten(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("base", seed=0)
    ckpt = flare_jax.convert_hf(directory, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        flare_jax.convert_hf(directory, ckpt)
    flare_jax.convert_hf(directory, ckpt, overwrite=True)
    assert flare_jax.load(ckpt).config.vocab_size == 96
