"""Helpers of the training tests: subprocess workers with their own device counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("workers.py")
REPO = WORKERS.parents[2]
LAUNCHER = REPO / "launch" / "local.py"


def worker_env(devices: int, cache_dir: Path) -> dict[str, str]:
    """CPU-only env with ``devices`` host devices; a compilation cache shared by the workers and
    XLA's cheaper CPU backend optimisation and its older (~3x faster to compile) fusion
    emitters: compile time dominates these tiny runs."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
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
    AR-only). Only test_multidevice.py uses it: xdist runs a file's tests on one worker (--dist
    loadfile), so the job runs once."""
    return run_worker("meshes", 4)


def launch_command(processes: int, devices: int, args: list[str], log_dir: Path,
                   timeout: float) -> list[str]:
    """``launch/local.py -n processes --cpu-devices devices --exec <python> -- args``."""
    return [sys.executable, str(LAUNCHER), "-n", str(processes), "--cpu-devices", str(devices),
            "--log-dir", str(log_dir), "--timeout", str(timeout), "--exec", sys.executable, "--",
            *args]


def launch(processes: int, devices: int, args: list[str], cache_dir: Path, log_dir: Path,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a :func:`launch_command` job to its end."""
    return subprocess.run(launch_command(processes, devices, args, log_dir, timeout),
                          env=worker_env(devices, cache_dir), capture_output=True, text=True,
                          timeout=timeout + 60)


def job_logs(log_dir: Path) -> str:
    """The tails of every process log of a launched job (for assertion messages)."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                     for p in sorted(log_dir.glob("process_*.log")))


@pytest.fixture(scope="session")
def run_job(tmp_path_factory, compile_cache):
    """``run_job(worker, processes, devices, *args) -> [dict per process]``: a worker run as a
    ``launch/local.py`` job; its per-process JSON results."""

    def run(name: str, processes: int, devices: int, *args: str) -> list[dict]:
        root = tmp_path_factory.mktemp(f"{name}_{processes}x{devices}")
        out = root / "result.json"
        proc = launch(processes, devices, [str(WORKERS), name, str(out), *args], compile_cache,
                      root / "logs")
        assert proc.returncode == 0, job_logs(root / "logs") + proc.stderr[-2000:]
        return [json.loads((root / f"result_{i}.json").read_text()) for i in range(processes)]

    return run


# processes x devices per process, and the meshes run beyond the first job's (which runs all):
# 4 x 2 only runs fsdp+tensor, the mesh with the most cross-process collectives (CI time).
LAYOUTS = ((1, 8, "data,fsdp,fsdp_tensor"), (2, 4, "data,fsdp,fsdp_tensor"), (4, 2, "fsdp_tensor"))


@pytest.fixture(scope="session")
def layout_runs(run_job, tmp_path_factory) -> tuple[Path, dict]:
    """The ``layouts`` worker as 1 x 8, 2 x 4 and 4 x 2 process jobs (in this order: the first
    writes the shared checkpoints); the shared directory and the results per layout. Only
    test_launch.py uses it (one xdist worker, as for ``mesh_results``)."""
    shared = tmp_path_factory.mktemp("layouts_shared")
    return shared, {f"{n}x{d}": run_job("layouts", n, d, str(shared), meshes)
                    for n, d, meshes in LAYOUTS}
