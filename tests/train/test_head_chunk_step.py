"""The train step with the chunked cross-entropies through the head (``StepConfig.vocab_chunk``:
vocabulary chunks; ``StepConfig.token_chunk``: position chunks, gradients formed in the forward
pass) equals the full-logits step: loss, token counts and gradients, for the FLARE objective with
tied embeddings and the causal objective with an untied head."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from workers import fixed_batch, tiny_training

from flare_jax.config import ModelConfig
from flare_jax.train.init import init_params
from flare_jax.train.mesh import make_mesh
from flare_jax.train.sharding import global_batch
from flare_jax.train.step import ModelBinder, init_state, make_train_step, state_shardings

# fp32 with full-precision matmuls on both paths: the chunked logsumexp only sums in another
# order (fp32 ulps of O(1) numbers); SGD with learning rate 1 makes the parameter change the
# gradient itself, compared at 1e-6 absolute (entries are O(1e-3..1e-1)); a chunk boundary
# counted twice or missed moves the loss and gradients by far more.
LOSS_RTOL, GRAD_ATOL = 1e-6, 1e-6
HEADS = {
    "vocab_chunks": {"vocab_chunk": 24},  # the tiny vocabulary of 64 = 2 x 24 + 16: overlaps
    # 2 rows of 16 positions: causal 15 scored positions per row, FLARE 15 + 16 side by side
    # (unshifted diffusion term); steps of 5 positions per row, the last one padded with FLARE
    "token_chunks": {"vocab_chunk": 0, "token_chunk": 10},
    # the same over 2 accumulated micro-batches of one row: each scales its forward-formed
    # gradients by its own loss weight, and their sum must be the full batch's
    "token_chunks_accum2": {"vocab_chunk": 0, "token_chunk": 10, "grad_accum": 2},
}


def _one_step(objective: str, tied: bool, head: dict[str, int]) -> tuple[dict, dict]:
    """One SGD step (learning rate 1) with the head settings ``head`` (``StepConfig`` fields):
    its metrics and the parameter change (the gradient)."""
    model_config, _, step_cfg = tiny_training()
    model_config = ModelConfig.from_dict({**model_config.to_dict(), "tie_word_embeddings": tied})
    step_cfg = dataclasses.replace(step_cfg, objective=objective, **head)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = optax.sgd(1.0)
    params = init_params(model_config, 0, mesh)
    before = jax.tree.map(np.asarray, params)
    step = make_train_step(ModelBinder(model_config, jax.numpy.float32, "reference"), tx,
                           step_cfg, mesh, state_shardings(tx, params, mesh), seed=0)
    state, metrics = step(init_state(tx, params, mesh),
                          global_batch(fixed_batch(2, 16, model_config.vocab_size), mesh))
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)
    return {k: float(v) for k, v in metrics.items()}, grads


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("objective, tied", [("flare", True), ("causal", False)])
def test_chunked_step_equals_full_logits_step(objective, tied, head):
    dense_metrics, dense_grads = _one_step(objective, tied, {"vocab_chunk": 0})
    metrics, grads = _one_step(objective, tied, HEADS[head])
    assert metrics["ar_tokens"] == dense_metrics["ar_tokens"] > 0
    assert metrics["diffusion_tokens"] == dense_metrics["diffusion_tokens"]
    np.testing.assert_allclose(metrics["loss"], dense_metrics["loss"], rtol=LOSS_RTOL)
    head = grads["embed_tokens"] if tied else grads["lm_head"]["kernel"]
    assert np.abs(head).max() > 1e-3  # the head's gradient is compared below, and not empty
    expected = jax.tree.leaves(dense_grads)
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), expected, strict=True):
        np.testing.assert_allclose(g, e, atol=GRAD_ATOL, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_bf16_logits_reach_the_step():
    # StepConfig.logits_dtype reaches the head: the loss moves by the bf16 rounding of the tiny
    # model's O(0.1-1) logits (relative 2^-9 each, so ~1e-3 of an O(4) loss at most), not by 0
    # and not by more.
    fp32, _ = _one_step("flare", True, HEADS["token_chunks"])
    bf16, _ = _one_step("flare", True, {**HEADS["token_chunks"], "logits_dtype": "bfloat16"})
    assert bf16["loss"] != fp32["loss"]
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=1e-3)
