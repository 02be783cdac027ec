"""Helpers of the training tests: subprocess workers with their own device counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("workers.py")
REPO = WORKERS.parents[2]


def worker_env(devices: int, cache_dir: Path) -> dict[str, str]:
    """CPU-only env with ``devices`` host devices; a compilation cache shared by the workers and
    XLA's cheaper CPU backend optimisation (compile time dominates these tiny runs)."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


def _command(name: str, out: Path, *args: int) -> list[str]:
    return [sys.executable, str(WORKERS), name, str(out), *map(str, args)]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def run_worker(tmp_path_factory, compile_cache):
    """``run_worker(name, devices, *args) -> dict``: run one worker, return its JSON result."""

    def run(name: str, devices: int, *args: int) -> dict:
        out = tmp_path_factory.mktemp(name) / "result.json"
        proc = subprocess.run(_command(name, out, *args), env=worker_env(devices, compile_cache),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(out.read_text())

    return run


@pytest.fixture(scope="session")
def mesh_results(run_worker) -> dict:
    """The ``meshes`` worker's runs (1 device; data, fsdp, fsdp+tensor meshes; accumulation;
    AR-only)."""
    return run_worker("meshes", 4)


@pytest.fixture
def run_distributed(tmp_path, compile_cache):
    """Run the ``distributed`` worker as 2 processes (2 host devices each); their results."""

    def run() -> list[dict]:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        outs = [tmp_path / f"process_{i}.json" for i in range(2)]
        procs = [subprocess.Popen(_command("distributed", outs[i], i, port),
                                  env=worker_env(2, compile_cache), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        errors = [p.communicate(timeout=600)[1] for p in procs]
        for proc, err in zip(procs, errors, strict=True):
            assert proc.returncode == 0, err[-4000:]
        return [json.loads(o.read_text()) for o in outs]

    return run
