"""The GPU memory-pool default of training entry points."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

import flare_jax.train
from flare_jax import cli
from flare_jax.train.memory import MEMORY_FRACTION, POOL_VARIABLES, default_memory_fraction

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_sets_the_fraction_only_when_the_pool_is_unset():
    environ = {"PATH": "/bin"}
    assert default_memory_fraction(environ)
    assert environ == {"PATH": "/bin", "XLA_CLIENT_MEM_FRACTION": str(MEMORY_FRACTION)}
    for name in POOL_VARIABLES:  # a pool the user chose (fraction, no preallocation, allocator)
        environ = {name: "false" if name.endswith("PREALLOCATE") else "0.5"}
        assert not default_memory_fraction(environ)
        assert environ == {name: environ[name]} and len(environ) == 1


@pytest.fixture
def pool_unset(monkeypatch):
    for name in POOL_VARIABLES:
        monkeypatch.setenv(name, "restored-after-the-test")
        monkeypatch.delenv(name)


def test_flare_train_sets_the_pool_before_training(pool_unset, monkeypatch):
    seen = {}

    def fake_train(cfg):
        seen["fraction"] = os.environ.get("XLA_CLIENT_MEM_FRACTION")
        return types.SimpleNamespace(export_dir=None)

    monkeypatch.setattr(flare_jax.train, "train", fake_train)
    assert cli.main(["train", "--config", str(CONFIGS / "tiny_cpu.py")]) == 0
    assert seen["fraction"] == str(MEMORY_FRACTION)
