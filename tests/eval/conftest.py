"""A tiny converted checkpoint with a character tokenizer, shared by the evaluation tests."""

from __future__ import annotations

import shutil

import pytest
from eval_helpers import ALPHABET

import flare_jax
from flare_jax.convert.synthetic import write_char_tokenizer


@pytest.fixture(scope="session")
def eval_checkpoint(hf_checkpoint, tmp_path_factory):
    """A flare-jax checkpoint dir (mask token 2) holding a tokenizer whose vocab fits the model."""
    directory, _ = hf_checkpoint("eval", seed=7, mask_token_id=2)
    ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp("eval") / "ckpt")
    tokenizer_dir = tmp_path_factory.mktemp("eval_tok")
    write_char_tokenizer(tokenizer_dir, ALPHABET)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, ckpt / name)
    return ckpt


@pytest.fixture(scope="session")
def eval_sampler(eval_checkpoint):
    return flare_jax.Sampler.load(eval_checkpoint)
