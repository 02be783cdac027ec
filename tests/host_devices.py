"""Run a test file's worker in a subprocess with its own number of CPU host devices (the test
session itself has one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run_with_devices(script: str, devices: int, out: Path, timeout: float = 600) -> dict:
    """``python script out`` with ``devices`` CPU devices and the tests' cheap XLA settings;
    returns the JSON the script wrote to ``out``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                        "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
