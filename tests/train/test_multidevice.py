"""Sharded training on CPU host devices, in subprocesses (each with its own device count):
several meshes and a 2-process ``jax.distributed`` run give the 1-device losses and parameters."""

import numpy as np

# fp32 everywhere ('highest' matmul precision): sharded runs differ from one device only in the
# order of reductions (sums split across devices or micro-batches), ~1e-7 relative per op, so the
# losses agree to 1e-5. Parameters after three AdamW steps (the first at lr 0, warmup): Adam
# divides by sqrt(v), which turns rounding differences of near-zero gradient entries into update
# differences; the update is bounded by lr <= 1e-2 per step and we allow 1e-4 absolute (1% of one
# step; seen: < 1e-5).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def _assert_same_run(run: dict, reference: dict) -> None:
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(run["params"], reference["params"], atol=PARAM_ATOL, rtol=0)


def test_meshes_match_one_device(mesh_results):
    result = mesh_results
    reference = result["one_device"]
    assert reference["losses"][2] < reference["losses"][0]  # the steps really train
    # fsdp_tensor_accum2 also accumulates 2 micro-batches: it must equal the full-batch step.
    for name in ("data", "fsdp", "fsdp_tensor_accum2"):
        _assert_same_run(result[name], reference)


def test_two_processes_match_one_process(mesh_results, run_distributed):
    reference = mesh_results["one_device"]
    processes = run_distributed()
    for result in processes:
        assert result["process_count"] == 2 and result["device_count"] == 4
        _assert_same_run(result, reference)
