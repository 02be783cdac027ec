"""Shared fixtures: tiny random Qwen3.5 HF checkpoints built with transformers + CPU torch."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests are compile-bound: the legacy CPU fusion emitters compile several times faster, and
# LLVM optimisation level 0 halves the CPU time of the suite again (same results within every
# test's tolerance; only the run time of large programs would suffer, and there are none here).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                                   "--xla_cpu_use_fusion_emitters=false "
                                   "--xla_backend_optimization_level=0")
# One persistent compilation cache for the session and the subprocesses it starts: programs that
# tests (and the demo's stages) rebuild with fresh jit wrappers but identical HLO compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flare_jax_test_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

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
