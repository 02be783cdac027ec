"""Scanning repeated layer groups (``scan_layers``): which stacks repeat, and the scanned program
gives the unrolled program's numbers (logits of both call modes and every parameter gradient)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import TINY

from flare_jax.config import FULL, LINEAR, ModelConfig
from flare_jax.layout import FlareLayout
from flare_jax.model.hybrid import HybridLM
from flare_jax.model.layer_scan import group_period
from flare_jax.model.moe import load_balancing_loss
from flare_jax.train import apply_overrides, load_config_file

L, F = LINEAR, FULL
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = dict(TINY, hidden_size=32, intermediate_size=48, vocab_size=40)


def model_config(layer_types: list[str]) -> ModelConfig:
    return ModelConfig.from_hf_dict({"model_type": "qwen3_5_text", **SMALL, "mask_token_id": 2,
                                     "num_hidden_layers": len(layer_types),
                                     "layer_types": layer_types})


@pytest.mark.parametrize("types, period", [
    ([L, L, L, F] * 3, 4),
    ([L, F, L, F, L], 2),  # two full groups, the fifth layer runs unrolled after the scan
    ([L, L], 1),
    ([L, F], None),  # the group occurs once: nothing to scan
    ([L, L, F], None),
])
def test_group_period(types, period):
    model = nnx.eval_shape(lambda: HybridLM(model_config(types), rngs=nnx.Rngs(0)))
    assert group_period(model.layers) == period


def test_scanned_layers_equal_unrolled_layers():
    """Layers [L, F] x 2 + L: a scan over 2 groups of 2, then the tail layer unrolled. The scanned
    run also remats (FLARE call "selective", causal call "full"; the unrolled one does not: remat
    must not change numbers) and both apply a ``constrain`` hook that scales the hidden states,
    so a missed or extra call would show; the same for the causal call."""
    model = HybridLM(model_config([L, F, L, F, L]), dtype=jnp.float32, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    clean = rng.integers(3, 40, (1, 16)).astype(np.int32)
    noisy = np.where(rng.random(clean.shape) < 0.5, 2, clean).astype(np.int32)
    segments = np.where(np.arange(16) < 7, 1, 2).astype(np.int32)[None]
    layout = FlareLayout.from_segments(jnp.asarray(segments), 8)
    weights = jnp.asarray(rng.normal(size=(3, 16, 40)), jnp.float32)

    def loss(params, scan: bool):
        m = nnx.merge(graphdef, params)
        out_clean, out_noisy = m.flare(clean, noisy, layout, remat="selective" if scan else "none",
                                       constrain=lambda h: 0.9 * h, scan_layers=scan)
        causal, _ = m(clean, segments, scan_layers=scan, remat="full" if scan else "none",
                      constrain=lambda h: 0.9 * h)
        outs = (out_clean, out_noisy, causal)
        return sum(jnp.sum(w * o) for w, o in zip(weights, outs, strict=True)), outs

    # Both call modes run their groups as one scan of length 2 (the linear layers' recurrences
    # are nested inside it; the tail layer's are at the top level).
    eqns = jax.make_jaxpr(lambda p: loss(p, True))(params).eqns
    assert [e.params["length"] for e in eqns if e.primitive.name == "scan"].count(2) == 2

    def run(scan: bool):
        step = jax.jit(jax.value_and_grad(lambda p: loss(p, scan), has_aux=True))
        # Without XLA's CPU backend optimisations (most of the compile time); both programs alike.
        return step.lower(params).compile({"xla_backend_optimization_level": 0})(params)

    (_, unrolled), grads_unrolled = run(False)
    (_, scanned), grads_scanned = run(True)
    # fp32 ('highest' matmuls): the same operations, but XLA fuses a loop body differently from
    # straight-line code, so sums reassociate (~1e-7 per op, compounded over 5 layers).
    # Logits: 1e-6 relative to their largest entry.
    for a, b in zip(unrolled, scanned, strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * scale)
    # Gradients: every parameter within 1e-6 of the largest gradient entry. Small-magnitude
    # leaves (A_log, dt_bias, ~1e-4 of the largest) are sums with heavy cancellation, so a
    # per-leaf relative bound would measure cancellation, not the scan.
    flat_unrolled = dict(nnx.to_flat_state(grads_unrolled))
    flat_scanned = dict(nnx.to_flat_state(grads_scanned))
    assert flat_unrolled.keys() == flat_scanned.keys()
    scale = max(float(jnp.max(jnp.abs(v[...]))) for v in flat_unrolled.values())
    for path, g in flat_unrolled.items():
        assert float(jnp.max(jnp.abs(g[...]))) > 0, path  # every layer gets a gradient
        np.testing.assert_allclose(flat_scanned[path][...], g[...], rtol=0, atol=1e-6 * scale,
                                   err_msg=str(path))


def test_router_statistics_scanned_equal_unrolled():
    """Two sparse full-attention layers (one scanned group each; full attention compiles fast):
    the FLARE call's router statistics count both streams of every layer at the unmasked
    positions, and the scanned (remat) program gives the unrolled program's load-balancing loss
    and gradients. A dense model returns no statistics."""
    config = ModelConfig.from_hf_dict({
        **{k: v for k, v in SMALL.items() if k != "intermediate_size"},
        "model_type": "qwen3_5_moe_text", "mask_token_id": 2, "num_hidden_layers": 2,
        "layer_types": [F, F], "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16})
    # Parameters drawn with numpy: eager jax.random init compiles one program per shape.
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: HybridLM(config, dtype=jnp.float32,
                                                                 rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
                          shapes)
    clean = rng.integers(3, 40, (1, 16)).astype(np.int32)
    noisy = np.where(rng.random(clean.shape) < 0.5, 2, clean).astype(np.int32)
    layout = FlareLayout.from_segments(jnp.ones((1, 16), jnp.int32), 8)
    mask = jnp.arange(16)[None] < 13  # tail padding

    def aux(params, scan: bool):
        m = nnx.merge(graphdef, params)
        *_, stats = m.flare(clean, noisy, layout, remat="selective" if scan else "none",
                            scan_layers=scan, token_mask=mask, with_router_stats=True)
        return load_balancing_loss(stats), stats

    results = {}
    for scan in (False, True):
        step = jax.jit(jax.value_and_grad(lambda p, scan=scan: aux(p, scan), has_aux=True))
        results[scan] = step.lower(params).compile({"xla_backend_optimization_level": 0})(params)
    ((loss, stats), grads), ((loss_scan, stats_scan), grads_scan) = results[False], results[True]
    assert float(stats.tokens) == 2 * 2 * 13  # 2 sparse layers x 2 streams x 13 tokens
    assert float(stats.slots.sum()) == 2 * float(stats.tokens)  # top-2: two slots per token
    # fp32: as in test_scanned_layers_equal_unrolled, only the order of fp32 sums differs.
    np.testing.assert_allclose(float(loss_scan), float(loss), rtol=1e-6)
    np.testing.assert_allclose(stats_scan.probs, stats.probs, rtol=1e-5)
    flat, flat_scan = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_scan))
    scale = max(float(jnp.max(jnp.abs(v[...]))) for v in flat.values())
    for path, g in flat.items():
        np.testing.assert_allclose(flat_scan[path][...], g[...], rtol=0, atol=1e-6 * scale,
                                   err_msg=str(path))
    assert float(jnp.max(jnp.abs(flat[("layers", 0, "mlp", "gate", "kernel")][...]))) > 0
    dense, dense_shapes = nnx.split(nnx.eval_shape(lambda: HybridLM(model_config([L, F]),
                                                                     rngs=nnx.Rngs(0))))
    out = jax.eval_shape(lambda s: nnx.merge(dense, s)(clean, with_router_stats=True),
                         dense_shapes)
    assert len(out) == 3 and out[2] is None


@pytest.mark.parametrize("name, scan", [("tiny_cpu", False), ("qwen3_5_0p8b", False), ("qwen3_5_2b", True)])
def test_config_switch(name, scan):
    cfg = load_config_file(CONFIGS / f"{name}.py")
    assert cfg.model.scan_layers is scan
    apply_overrides(cfg, [f"--config.model.scan_layers={not scan}"])
    assert cfg.model.scan_layers is (not scan)
