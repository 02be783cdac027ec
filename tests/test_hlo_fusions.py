"""The HLO-dump lookup of the benchmarks finds a profiled kernel's fusions (by either spelling of
its name, with all that share its kernel), lists the ops and shapes inside them and
the source lines they come from, on a dump XLA writes here on the CPU of functions defined in
this file."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hlo_fusions import REPO, Frame, Module, describe, hlo_spellings, profile_table  # noqa: E402

HERE = Path(__file__).resolve()
PROGRAM = f"""
import sys, jax, jax.numpy as jnp
sys.path.insert(0, {str(HERE.parent)!r})
from test_hlo_fusions import tanh_sum
jax.jit(tanh_sum)(jnp.ones((64, 32)), jnp.ones((64, 32))).block_until_ready()
"""


def scaled_tanh(x):
    """The helper whose ``tanh`` the dump must attribute to this file."""
    return jnp.tanh(x * 2.0)


def tanh_sum(x, w):
    """Calls ``scaled_tanh``: the tanh's stack is that line, then this one."""
    return jnp.sum(scaled_tanh(x) * w, axis=0)


def line_of(function, text: str) -> int:
    """The file line of ``function``'s source line containing ``text``."""
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> str:
    """The after-optimizations text of ``jit(tanh_sum)`` on the CPU."""
    directory = tmp_path_factory.mktemp("dump")
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XLA_FLAGS=f"--xla_dump_to={directory} --xla_dump_hlo_as_text", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True)
    return next(directory.glob("*tanh_sum*after_optimizations.txt")).read_text()


def tanh_fusion(text: str) -> str:
    """The name of the fusion holding the tanh."""
    return next(line.split("=")[0].strip().lstrip("%") for line in text.splitlines()
                if "fusion(" in line and "tanh" in line)


def test_profile_names_map_to_hlo_names():
    assert hlo_spellings("gemm_fusion_dot_239") == {"gemm_fusion_dot_239", "gemm_fusion_dot.239"}


def test_describes_a_fusion_of_a_real_dump(dump):
    module, fusion = Module(dump), tanh_fusion(dump)
    lines = describe(module, fusion, top=5)
    assert lines[0].startswith(f"{fusion}: %{fusion} = ")
    assert "tanh" in lines[1] and "mul" in lines[1]
    assert "f32[64,32]" in lines[2]
    assert f"tests/{HERE.name}:{line_of(scaled_tanh, 'jnp.tanh')}" in lines[3]
    assert describe(module, "no_such_fusion", top=5) == []


def test_stack_frames_run_from_the_op_out_to_its_callers(dump):
    module = Module(dump)
    tanh = next(line for line in dump.splitlines() if " tanh(" in line)
    chain = module.frames[int(re.search(r"stack_frame_id=(\d+)", tanh).group(1))]
    assert chain[:2] == (Frame(str(HERE), line_of(scaled_tanh, "jnp.tanh"), "scaled_tanh"),
                         Frame(str(HERE), line_of(tanh_sum, "scaled_tanh(x)"), "tanh_sum"))


def test_sources_name_this_file_and_line(dump):
    sources = Module(dump).sources(tanh_fusion(dump))
    relative = str(HERE.relative_to(REPO))
    tanh_line, call_line = line_of(scaled_tanh, "jnp.tanh"), line_of(tanh_sum, "scaled_tanh(x)")
    # x * 2.0 (a broadcast and a multiply) and the tanh are scaled_tanh's; the multiply by w is
    # tanh_sum's, on the line that also calls scaled_tanh.
    assert sources == {Frame(relative, tanh_line, "scaled_tanh"): 3,
                       Frame(relative, call_line, "tanh_sum"): 1}


SHARED = """HloModule jit_step

FileNames
1 "{root}/flare_jax/model/layers.py"
2 "/site-packages/jax/numpy.py"

FunctionNames
1 "rms_normalize"
2 "mean"

FileLocations
1 {{file_name_id=1 function_name_id=1 line=71 end_line=71 column=0 end_column=9}}
2 {{file_name_id=2 function_name_id=2 line=5 end_line=5 column=0 end_column=9}}

StackFrames
1 {{file_location_id=1 parent_frame_id=1}}
2 {{file_location_id=2 parent_frame_id=2}}


%fused_a (p: f32[8]) -> f32[8] {{
  %p = f32[8]{{0}} parameter(0)
  ROOT %m = f32[8]{{0}} multiply(%p, %p), metadata={{op_name="jit(step)/mul" stack_frame_id=2}}
}}

%fused_b (p: f32[8]) -> f32[8] {{
  %p = f32[8]{{0}} parameter(0)
  ROOT %m = f32[8]{{0}} multiply(%p, %p), metadata={{op_name="jit(step)/mul" stack_frame_id=1}}
}}

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}

%max (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] maximum(%a, %b)
}}

%sum_a (p: f32[8], z: f32[]) -> f32[] {{
  %p = f32[8]{{0}} parameter(0)
  %z = f32[] parameter(1)
  ROOT %r = f32[] reduce(%p, %z), dimensions={{0}}, to_apply=%add, metadata={{op_name="jit(step)/reduce_sum"}}
}}

%sum_b (q: f32[8], y: f32[]) -> f32[] {{
  %q = f32[8]{{0}} parameter(0)
  %y = f32[] parameter(1)
  ROOT %t = f32[] reduce(%q, %y), dimensions={{0}}, to_apply=%add, metadata={{op_name="jit(step)/reduce_sum"}}
}}

%max_a (p: f32[8], z: f32[]) -> f32[] {{
  %p = f32[8]{{0}} parameter(0)
  %z = f32[] parameter(1)
  ROOT %r = f32[] reduce(%p, %z), dimensions={{0}}, to_apply=%max
}}

ENTRY %main (x: f32[8]) -> f32[8] {{
  %x = f32[8]{{0}} parameter(0)
  %zero = f32[] constant(0)
  %wrapped_reduce = f32[] fusion(%x, %zero), kind=kLoop, calls=%sum_a
  %wrapped_reduce.1 = f32[] fusion(%x, %zero), kind=kLoop, calls=%sum_b
  %wrapped_reduce.2 = f32[] fusion(%x, %zero), kind=kLoop, calls=%max_a
  %loop_multiply_fusion.3 = f32[8]{{0}} fusion(%x), kind=kLoop, calls=%fused_a, metadata={{deduplicated_name="loop_multiply_fusion.9"}}
  ROOT %loop_multiply_fusion.9 = f32[8]{{0}} fusion(%loop_multiply_fusion.3), kind=kLoop, calls=%fused_b, metadata={{deduplicated_name="loop_multiply_fusion.9"}}
}}
"""  # noqa: E501


def test_a_name_stands_for_every_fusion_sharing_its_kernel():
    module = Module(SHARED.format(root=REPO))
    # A GPU profile names such a kernel after one of its fusions, not always the deduplicated name.
    assert len(module.lines("loop_multiply_fusion_3")) == len(module.lines("loop_multiply_fusion.9")) == 2
    # Without a deduplicated name, fusions share the kernel of the same code (names and metadata
    # aside), reducers included.
    reduces = [line.split()[0] for line in module.lines("wrapped_reduce")]
    assert reduces == ["%wrapped_reduce", "%wrapped_reduce.1"]
    assert len(module.lines("wrapped_reduce_2")) == 1
    # The numpy frame is outside the repo; its child frame 2 has frame 1 (layers.py:71) as parent.
    assert module.frames[2][1].line == 71
    layers = Frame("flare_jax/model/layers.py", 71, "rms_normalize")
    assert module.sources("loop_multiply_fusion_3") == {layers: 2}
    kernels = [{"name": "loop_multiply_fusion_3", "ms_per_call": 3.0},
               {"name": "nvjet_x", "ms_per_call": 1.0}]
    table = profile_table(module, kernels, top=2, lines=5)
    assert table[1].split()[:3] == ["loop_multiply_fusion_3", "3.000", "2"]
    assert "flare_jax/model/layers.py:71×2" in table[1] and "mul×2" in table[1]
    assert table[2].split()[:3] == ["nvjet_x", "1.000", "0"]
    totals = table[next(i for i, line in enumerate(table) if line.startswith("ms per step")) + 2:]
    assert totals[0].split()[:3] == ["3.000", "75.0%", "1"] and "layers.py:71 rms_normalize" in totals[0]
    assert totals[1].split()[:3] == ["1.000", "25.0%", "1"] and "not an XLA fusion" in totals[1]
