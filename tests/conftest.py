"""Shared fixtures: tiny random Qwen3.5 HF checkpoints built with transformers + CPU torch."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The legacy CPU fusion emitters compile several times faster (the tests are compile-bound).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                                   "--xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402
import pytest  # noqa: E402
from tiny_models import build_hf_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: ``hf_checkpoint(name, seed, **config_overrides) -> (directory, torch_model)``."""
    cache: dict = {}

    def make(name: str = "base", seed: int = 0, **overrides):
        if name not in cache:
            model = build_hf_model(seed, **overrides)
            directory = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(directory)
            cache[name] = (directory, model)
        return cache[name]

    return make
