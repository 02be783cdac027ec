"""Training in the ``meshes`` subprocess worker (4 CPU host devices): several meshes give the
1-device losses and parameters, and AR-only FLARE training is plain causal LM training
(multi-process ``jax.distributed`` jobs: test_launch.py)."""

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


def test_ar_only_training_is_causal_lm_training(mesh_results):
    # Run by the subprocess worker (cheaper XLA compile): a FLARE step with diffusion_weight 0
    # vs. the plain causal LM loss of the same batch (next token, same document, loss tokens).
    result = mesh_results["ar_only"]
    # fp32 with 'highest' matmuls; the clean stream equals causal mode (model tests), the mean is
    # over the same tokens in another summation order: 1e-6 relative.
    np.testing.assert_allclose(result["losses"][0], result["causal_loss"], rtol=1e-6)
    ar_tokens, diffusion_tokens = result["tokens"][0]
    assert ar_tokens == result["causal_tokens"]
    assert diffusion_tokens > 0  # the noisy stream ran, with zero weight
