"""Sharded training on CPU host devices, in a subprocess with 4 devices: several meshes give the
1-device losses and parameters (multi-process ``jax.distributed`` jobs: test_launch.py)."""

import numpy as np

# fp32 everywhere ('highest' matmul precision): sharded runs differ from one device only in the
# order of reductions (sums split across devices or micro-batches), ~1e-7 relative per op, so the
# losses agree to 1e-5. Parameters after three AdamW steps (the first at lr 0, warmup): Adam
# divides by sqrt(v) + eps, which turns rounding differences of near-zero gradient entries into
# update differences. At this init the gate parameters of the linear layer (A_log, dt_bias,
# in_proj_a) have gradients of ~1e-10, pure rounding, so their updates (lr 1e-2 x g / (|g| + 1e-8)
# ~ 1e-4 per step) take rounding-dependent directions: seen up to 4e-4 on the fsdp+tensor mesh
# with accumulation; every other entry agrees to < 1e-6. We allow 1e-3 (10% of one lr step).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-3


def _assert_same_run(run: dict, reference: dict) -> None:
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(run["params"], reference["params"], atol=PARAM_ATOL, rtol=0)


def test_meshes_match_one_device(mesh_results):
    result = mesh_results
    reference = result["one_device"]
    assert reference["losses"][2] < reference["losses"][0]  # the steps really train
    # fsdp_tensor_accum2 also accumulates 2 micro-batches: it must equal the full-batch step;
    # fsdp_tensor_token_chunks takes the head's cross-entropy over position chunks (its
    # gradients formed in the forward pass) instead of over the vocabulary.
    for name in ("data", "fsdp", "fsdp_tensor_accum2", "fsdp_tensor_token_chunks"):
        _assert_same_run(result[name], reference)
