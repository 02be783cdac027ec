"""Remat policies (``model.remat``): what each keeps for the backward pass, and that none changes
the numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from tiny_models import TINY

from flare_jax.config import FULL, LINEAR, ModelConfig
from flare_jax.layout import FlareLayout
from flare_jax.model.hybrid import HybridLM
from flare_jax.model.layer_scan import check_remat, checkpoint_policy

SMALL = dict(TINY, hidden_size=32, intermediate_size=48, vocab_size=40)
LENGTH, BLOCK = 32, 16


def _model(backend: str) -> HybridLM:
    config = ModelConfig.from_hf_dict({"model_type": "qwen3_5_text", **SMALL, "mask_token_id": 2,
                                       "num_hidden_layers": 2, "layer_types": [LINEAR, FULL]})
    return HybridLM(config, dtype=jnp.float32, rngs=nnx.Rngs(5), backend=backend)


def _inputs():
    rng = np.random.default_rng(0)
    clean = rng.integers(3, 40, (1, LENGTH)).astype(np.int32)
    noisy = np.where(rng.random(clean.shape) < 0.5, 2, clean).astype(np.int32)
    segments = np.where(np.arange(LENGTH) < 11, 1, 2).astype(np.int32)[None]
    weights = jnp.asarray(rng.normal(size=(2, LENGTH, 40)), jnp.float32)
    return clean, noisy, FlareLayout.from_segments(jnp.asarray(segments), BLOCK), weights


def _loss_fn(graphdef, remat: str):
    clean, noisy, layout, weights = _inputs()

    def loss(params):
        outs = nnx.merge(graphdef, params).flare(clean, noisy, layout, remat=remat)
        return sum(jnp.sum(w * o) for w, o in zip(weights, outs, strict=True))
    return loss


def test_selective_remat_recomputes_only_elementwise_work():
    """Gradient programs on the GPU kernels (interpret mode), FLOPs as XLA counts them after
    removing dead code: "full" recomputes each layer's forward (matmuls and kernels: about a
    third more than "none" at this size); "selective" keeps the projections' outputs, the ops'
    outputs and the kernels' residuals, so it recomputes only elementwise work (norms, gates,
    activations), under a quarter of "full"'s extra (0.15 measured; a policy that lost the
    names would recompute as much as "full")."""
    graphdef, params = nnx.split(_model("gpu_interpret"))

    def flops(remat: str) -> float:
        grad = jax.jit(jax.grad(_loss_fn(graphdef, remat)))
        cost = grad.lower(params).compile({"xla_backend_optimization_level": 0}).cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    none, full, selective = (flops(r) for r in ("none", "full", "selective"))
    assert full > 1.2 * none
    assert selective - none < 0.25 * (full - none), (none, full, selective)


def _linear_layer_residuals(remat: str, capsys) -> tuple[str, nnx.State]:
    """What one linear-attention layer's FLARE call saves for the backward pass under ``remat``
    (``print_saved_residuals`` output, GPU kernels in interpret mode) and the layer's state."""
    graphdef, params = nnx.split(_model("gpu_interpret"))
    _, _, layout, _ = _inputs()
    layer_graph, layer_state = nnx.split(nnx.merge(graphdef, params).layers[0])
    h = jnp.ones((1, 2 * LENGTH, SMALL["hidden_size"]), jnp.float32)

    def layer_loss(state, h):
        return jnp.sum(nnx.merge(layer_graph, state).flare(h, layout)[0])

    print_saved_residuals(jax.checkpoint(layer_loss, policy=checkpoint_policy(remat)),
                          layer_state, h)
    return capsys.readouterr().out, layer_state


def test_selective_remat_keeps_one_copy_of_the_conv_input(capsys):
    """The conv kernels read the projection of the whole FLARE row (both streams,
    ``[B, 2T, C]``) in place: "selective" keeps that one array, and neither a stream's half nor
    a zero-padded ``[B, T + K - 1, C]`` copy of it."""
    saved, layer_state = _linear_layer_residuals("selective", capsys)
    kernel, conv_dim = layer_state["linear_attn"]["conv_weight"][...].shape
    assert f"[1,{2 * LENGTH},{conv_dim}] named 'projection'" in saved
    assert f"[1,{LENGTH},{conv_dim}]" not in saved
    assert f"[1,{LENGTH + kernel - 1},{conv_dim}]" not in saved


def test_selective_inputs_keeps_what_the_matmuls_read(capsys):
    """"selective_inputs" keeps, beyond "selective"'s, every projection's input: the SwiGLU
    activation ``[1, 2L, I]`` that the down projection reads, the gated RMSNorm output of both
    streams ``[1, 2L, value dim]`` that the output projection reads and the RMSNorm outputs
    ``[1, 2L, hidden]``; "selective" keeps none of them (it recomputes them in the backward
    pass)."""
    selective, _ = _linear_layer_residuals("selective", capsys)
    saved, layer_state = _linear_layer_residuals("selective_inputs", capsys)
    value_dim = layer_state["linear_attn"]["out_proj"]["kernel"][...].shape[0]
    assert f"[1,{2 * LENGTH},{SMALL['intermediate_size']}] named 'projection_input'" in saved
    assert f"[1,{2 * LENGTH},{value_dim}] named 'projection_input'" in saved
    assert f"[1,{2 * LENGTH},{SMALL['hidden_size']}] named 'projection_input'" in saved
    assert "projection_input" not in selective


@pytest.mark.parametrize("remat", ["full", "selective", "selective_inputs"])
def test_remat_keeps_loss_and_gradients(remat):
    """fp32 on the CPU reference ops, unrolled layers (``nnx.remat`` with the policy): the loss
    and every parameter gradient equal the program without remat. Recomputation repeats the same
    fp32 operations, but XLA may fuse the recomputed copy differently, so sums can reassociate:
    1e-6 of the largest gradient entry."""
    graphdef, params = nnx.split(_model("reference"))
    results = {r: jax.jit(jax.value_and_grad(_loss_fn(graphdef, r)))(params) for r in ("none", remat)}
    (loss, grads), (loss_remat, grads_remat) = results["none"], results[remat]
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
    flat, flat_remat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_remat))
    scale = max(float(jnp.max(jnp.abs(v[...]))) for v in flat.values())
    for path, g in flat.items():
        np.testing.assert_allclose(flat_remat[path][...], g[...], rtol=0, atol=1e-6 * scale,
                                   err_msg=str(path))


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="remat must be one of"):
        check_remat(True)
    graphdef, params = nnx.split(_model("reference"))
    with pytest.raises(ValueError, match="got 'partial'"):
        _loss_fn(graphdef, "partial")(params)
