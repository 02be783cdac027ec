"""Mixture-of-experts training on CPU host devices: the FLARE train step of a tiny MoE model on a
(fsdp 2, expert 2) mesh equals the 1-device run; the router load-balancing loss is reported, equals
the model-level value, reaches the gradients only through ``loss.router_aux_weight`` and keeps
its full-batch value under gradient accumulation; dense models' steps ignore the weight. Also the
active-parameter FLOP count, the expert mesh axis and the config fields.

Tolerances (fp32, 'highest' matmul precision, plain SGD so that the update is minus the gradient):
- expert/fsdp mesh vs 1 device: only the order of sums differs (~1e-7 relative per op): losses,
  router losses and gradient norms 1e-5 relative; parameters after 3 steps 1e-6 absolute (SGD
  does not amplify rounding as Adam does; seen: ~7e-8). The routing is the same on both (a
  flipped top-k choice would show as a loss difference far above these bounds).
- step gradients vs ``jax.grad`` of the same losses: 1e-6 of the largest gradient entry.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workers import ROUTER_WEIGHT, TINY_CONFIG, tiny_training

from flare_jax.checkpoint import HF_CONFIG_FILE
from flare_jax.config import ModelConfig
from flare_jax.train import apply_overrides, load_config_file
from flare_jax.train import config as train_config
from flare_jax.train.mesh import make_mesh, mesh_axes, mesh_shape
from flare_jax.train.metrics import matmul_params, train_flops_per_row
from flare_jax.train.step import (
    ModelBinder,
    TrainState,
    abstract_params,
    make_train_step,
    state_shardings,
)

RTOL = 1e-5
PARAM_ATOL = 1e-6
GRAD_RTOL = 1e-6


@pytest.fixture(scope="module")
def moe_results(run_worker) -> dict:
    return run_worker("moe_meshes", 4)


def test_expert_parallel_steps_equal_one_device(moe_results):
    reference, sharded = moe_results["one_device"], moe_results["expert_fsdp"]
    assert sharded["expert_spec"] == "P('expert', 'fsdp', None)"  # experts really split
    assert reference["metrics"][2]["loss"] < reference["metrics"][0]["loss"]  # it trains
    for key in ("loss", "router_aux_loss", "grad_norm", "ar_loss", "diffusion_loss"):
        np.testing.assert_allclose([m[key] for m in sharded["metrics"]],
                                   [m[key] for m in reference["metrics"]], rtol=RTOL, err_msg=key)
    np.testing.assert_allclose(sharded["params"], reference["params"], atol=PARAM_ATOL, rtol=0)


def test_router_loss_is_reported_and_trained(moe_results):
    ref = moe_results["reference"]
    first = moe_results["one_device"]["metrics"][0]
    # The metric is the model-level loss of the step's batch (loss tokens of both streams), and
    # the step's loss adds it with its weight to the FLARE loss.
    np.testing.assert_allclose(first["router_aux_loss"], ref["aux"], rtol=1e-6)
    np.testing.assert_allclose(first["loss"], ref["ce"] + ROUTER_WEIGHT * ref["aux"], rtol=1e-6)
    # Gradients: weight 0 gives exactly the plain FLARE loss's, weight w adds w * grad(aux),
    # which moves the routers.
    assert ref["weight0_vs_ce"] <= GRAD_RTOL * ref["grad_scale"]
    assert ref["weighted_vs_expected"] <= GRAD_RTOL * ref["grad_scale"]
    assert ref["router_effect"] > 1e-3 * ref["grad_scale"]
    weight0 = moe_results["weight0"]["metrics"][0]
    # Still reported: the same forward, compiled into another step program (no router
    # gradient), whose fp32 fusions may round differently.
    np.testing.assert_allclose(weight0["router_aux_loss"], first["router_aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(weight0["loss"], ref["ce"], rtol=1e-6)


def test_accumulation_keeps_the_full_batch_router_loss(moe_results):
    """Two micro-batches: the router statistics are summed, so the reported values are the
    full-batch ones; the gradient uses each micro-batch's own expert loads (see
    ``make_train_step``), close to but not exactly the full-batch gradient."""
    full, accum = moe_results["one_device"]["metrics"][0], moe_results["accum2"]["metrics"][0]
    for key in ("loss", "router_aux_loss", "ar_loss", "diffusion_loss"):
        np.testing.assert_allclose(accum[key], full[key], rtol=1e-6, err_msg=key)
    ref = moe_results["reference"]
    # The difference is w * (micro-batch vs batch expert loads) * grad(P): small against the
    # gradient (seen 2e-4 of a 6.7e-2 largest entry), and not zero.
    assert 0 < ref["accum2_vs_full"] <= 1e-2 * ref["grad_scale"]


def test_dense_step_ignores_the_router_weight():
    """A dense model's step program does not depend on the router weight and reports no router
    loss (traced only: the jaxprs are compared, nothing is compiled)."""
    model_config, tx, step_cfg = tiny_training()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = abstract_params(model_config)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    batch = {"tokens": jax.ShapeDtypeStruct((4, 32), jnp.int32),
             "segment_ids": jax.ShapeDtypeStruct((4, 32), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((4, 32), jnp.bool_)}
    programs = []
    for weight in (0.0, 0.5):
        cfg = dataclasses.replace(step_cfg, loss=dataclasses.replace(step_cfg.loss,
                                                                     router_aux_weight=weight))
        step = make_train_step(ModelBinder(model_config, jnp.float32, "reference"), tx, cfg, mesh,
                               state_shardings(tx, params, mesh), seed=0)
        traced = step.trace(state, batch)
        programs.append(str(traced.jaxpr))
        assert "router_aux_loss" not in traced.out_info[1]
    assert programs[0] == programs[1]


def test_moe_flops_count_active_parameters_only():
    """Hand count on a tiny config: a sparse layer's MLP contributes the router (h x E), k routed
    experts (3 h I_moe each), the shared expert (3 h I_shared) and its gate (h x 1)."""
    h, experts, k, moe_width, shared_width, dense_width = 16, 4, 2, 8, 12, 24
    shape = dict(vocab_size=32, hidden_size=h, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, linear_num_key_heads=2,
                 linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                 layer_types=["linear_attention", "full_attention"])
    dense = ModelConfig.from_hf_dict({**shape, "model_type": "qwen3_5_text",
                                      "intermediate_size": dense_width})
    sparse = ModelConfig.from_hf_dict({
        **shape, "model_type": "qwen3_5_moe_text", "num_experts": experts,
        "num_experts_per_tok": k, "moe_intermediate_size": moe_width,
        "shared_expert_intermediate_size": shared_width})
    active_mlp = h * experts + k * 3 * h * moe_width + 3 * h * shared_width + h  # 1424
    assert active_mlp == 1424
    assert matmul_params(sparse) - matmul_params(dense) == 2 * (active_mlp - 3 * h * dense_width)
    seq, block = 64, 8
    extra = 3 * 2 * (2 * seq) * 2 * (active_mlp - 3 * h * dense_width)  # 3x fwd, 2 FLARE streams
    assert (train_flops_per_row(sparse, seq, block, flare=True)
            - train_flops_per_row(dense, seq, block, flare=True)) == extra
    # Twice the experts (same top-k): only the router grows, in both layers.
    wider = ModelConfig.from_dict({**sparse.to_dict(), "num_experts": 2 * experts})
    assert matmul_params(wider) - matmul_params(sparse) == 2 * h * experts


def test_mesh_expert_axis():
    assert mesh_shape(1, 2, 1, 4, expert=2) == (1, 2, 2, 1)
    assert mesh_axes((1, 2, 2, 1)) == ("data", "fsdp", "expert", "tensor")
    assert mesh_shape(1, -1, 1, 8, expert=2) == (1, 4, 2, 1)
    assert mesh_shape(1, 2, 1, 8, expert=-1) == (1, 2, 4, 1)
    assert mesh_shape(2, -1, 2, 8) == (2, 2, 2)  # no expert parallelism: three axes, as before
    assert mesh_axes((2, 2, 2)) == ("data", "fsdp", "tensor")
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(1, -1, 1, 8, expert=-1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape(1, 3, 1, 4, expert=2)


def _valid_config():
    cfg = load_config_file(TINY_CONFIG)
    cfg.workdir, cfg.data.tokenizer_dir = "runs/x", "tokenizer"
    return cfg


@pytest.mark.parametrize("field, value, match", [
    ("loss.router_aux_weight", -0.1, "config.loss.router_aux_weight: expected None or a number"),
    ("mesh.expert", 0, "config.mesh.expert: expected a positive int or -1"),
    ("mesh.fsdp", -1, "config.mesh: at most one of data/fsdp/expert/tensor may be -1"),
])
def test_config_validation(field, value, match):
    cfg = _valid_config()
    train_config.validate(cfg)  # the defaults: router weight None, expert 1
    section, key = field.split(".")
    cfg[section][key] = value
    cfg.mesh.expert = -1 if field == "mesh.fsdp" else cfg.mesh.expert
    with pytest.raises(train_config.TrainConfigError, match=match):
        train_config.validate(cfg)


def test_router_weight_from_the_hf_config(tmp_path):
    cfg = _valid_config()
    assert train_config.loss_config(cfg).router_aux_weight == 0.001  # HF's default
    cfg.model.hf_config.router_aux_loss_coef = 0.02
    assert train_config.loss_config(cfg).router_aux_weight == 0.02
    # A converted checkpoint keeps the source HF config (here a vision-language one, nested).
    (tmp_path / HF_CONFIG_FILE).write_text(json.dumps({"text_config": {
        "router_aux_loss_coef": 0.03}}))
    cfg.model.init_from = str(tmp_path)
    assert train_config.loss_config(cfg).router_aux_weight == 0.03
    cfg.loss.router_aux_weight = 0.5  # set explicitly: wins
    assert train_config.loss_config(cfg).router_aux_weight == 0.5
    apply_overrides(cfg, ["--config.loss.router_aux_weight=0"])
    assert train_config.loss_config(cfg).router_aux_weight == 0.0
