"""The HLO-dump lookup of the benchmarks finds a profiled kernel's fusion (by either spelling of
its name) and lists the ops and shapes inside it, on a dump XLA writes here on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hlo_fusions import describe, hlo_spellings  # noqa: E402

PROGRAM = """
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x * 2.0) * w, axis=0))
f(jnp.ones((64, 32)), jnp.ones((64, 32))).block_until_ready()
"""


def test_profile_names_map_to_hlo_names():
    assert hlo_spellings("gemm_fusion_dot_239") == {"gemm_fusion_dot_239", "gemm_fusion_dot.239"}


def test_describes_a_fusion_of_a_real_dump(tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text",
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True)
    text = next(tmp_path.glob("*lambda*after_optimizations.txt")).read_text()
    fusion = next(line.split("=")[0].strip().lstrip("%") for line in text.splitlines()
                  if "fusion(" in line and "tanh" in line)
    lines = describe(text, fusion, top=5)
    assert lines[0].startswith(f"{fusion}: %{fusion} = ")
    assert "tanh" in lines[1] and "mul" in lines[1]
    assert "f32[64,32]" in lines[2]
    assert describe(text, "no_such_fusion", top=5) == []
