"""`benchmarks/train_step.py` on several devices: its mesh path (the trainer's `make_mesh` from
`--mesh`, the global batch split over the data axes, host-drawn seed-0 parameters) gives the
same first-step losses on 1 and 4 host devices, and rejects a batch the mesh cannot split."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, worker_env
from jax.sharding import AbstractMesh

BENCHMARK = REPO / "benchmarks" / "train_step.py"
# The tiny config computes in fp32; the 1- and 4-device programs only split their sums
# differently (seen: 1e-7 relative), as in tests/train/test_launch.py: 1e-5 relative.
LOSS_RTOL = 1e-5
TINY = ["--config", str(REPO / "configs" / "tiny_cpu.py"), "--objective", "flare",
        "--seq", "32", "--batch", "4", "--steps", "2"]


def _start(devices: int, cache, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCHMARK), *TINY, *args],
                            env=worker_env(devices, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _row(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(compile_cache) -> dict:
    """The benchmark's rows on 1 device and on a 4-device fsdp x tensor mesh (run side by
    side)."""
    procs = {"one": _start(1, compile_cache, "--mesh", "1,1,1"),
             "four": _start(4, compile_cache, "--mesh", "1,2,2")}
    return {name: _row(p) for name, p in procs.items()}


def test_losses_match_across_meshes(runs):
    one, four = runs["one"], runs["four"]
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert len(one["losses"]) == len(four["losses"]) == 3  # the first step and 2 timed ones
    assert one["losses"][0] != one["losses"][1]  # the steps update the parameters
    for a, b in zip(one["losses"], four["losses"], strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)


def test_per_device_figures(runs):
    four = runs["four"]
    assert four["tokens_per_s_per_device"] * 4 == pytest.approx(four["tokens_per_s"])
    assert four["tokens_per_s"] == pytest.approx(4 * 32 / (four["step_ms"] / 1e3))
    # mfu is per device: model FLOPs / step time / devices / peak
    assert four["mfu"] == pytest.approx(
        four["model_tflops"] * 1e12 / (four["step_ms"] / 1e3) / 4 / 989e12)
    assert four["collectives"]["all-gather"] > 0  # fsdp gathers the weights
    assert runs["one"]["collectives"]["all-gather"] == 0


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_variant_flag_spells_both_heads():
    flag = _benchmark_module()._variant_flag
    vocab = flag("flare,2,selective,8192")
    assert (vocab.vocab_chunk, vocab.token_chunk, vocab.backend) == (8192, 0, "auto")
    tokens = flag("causal,1,remat,t4096,reference")
    assert (tokens.remat, tokens.vocab_chunk, tokens.token_chunk, tokens.backend) == (
        "full", 0, 4096, "reference")
    assert tokens.label() == "causal b1 remat full tokens 4096"
    assert tokens.logits_dtype == "float32"
    bf16 = flag("flare,4,selective,t4096-bf16")
    assert (bf16.token_chunk, bf16.logits_dtype) == (4096, "bfloat16")
    assert bf16.label() == "flare b4 remat selective tokens 4096 bfloat16 logits"
    with pytest.raises(Exception, match="--variant wants"):
        flag("flare,2,sometimes,8192")
    with pytest.raises(Exception, match="logits suffix wants -bf16"):
        flag("flare,2,selective,t4096-fp16")


def test_batch_must_split_over_the_data_axes():
    benchmark = _benchmark_module()
    mesh = AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))
    benchmark.check_batch(8, mesh)
    with pytest.raises(SystemExit, match=r"--batch 6 must be a multiple of the batch shards \(4"):
        benchmark.check_batch(6, mesh)
    benchmark.check_batch(3, AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor")))  # tensor: no split
