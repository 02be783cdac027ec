"""Sparse MoE families (Qwen3-Next, Qwen3.5-MoE): the grouped expert path against its dense
oracle, the router loss against HF's formula, logit and greedy parity with HF torch, bit-identical
conversion round trips, and the config parser.

Tolerances (fp32 everywhere, full-precision matmuls):
- grouped (``ragged_dot``) vs dense reference: 1e-5 max abs on outputs and gradients; both sum the
  same products, only the order of the fp32 additions differs.
- router loss vs HF: 1e-6 (a handful of fp32 sums).
- logits vs HF: 1e-4 max abs, as for the dense family (tests/test_parity.py). The inputs are
  checked to route away from near-ties (top-k margin > 1e-5): at a tie, fp32 rounding may pick a
  different expert on either side, which is a legitimate difference, not an error.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from host_devices import run_with_devices
from safetensors.torch import load_file
from tiny_models import TINY_MOE, TINY_NEXT, build_hf_moe_model, vlm_from_text

import flare_jax
from flare_jax.config import QWEN3_5_MOE, QWEN3_NEXT, ConfigError, ModelConfig
from flare_jax.model.moe import RouterStats, SparseMoE, load_balancing_loss, route, router_stats

FAMILIES = ("qwen3_next", "qwen3_5_moe")
ATOL = 1e-4
MIN_ROUTER_MARGIN = 1e-5


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """``{family: (hf_model, hf_dir, flare checkpoint dir)}``, converted from HF's save format."""
    out = {}
    for seed, family in enumerate(FAMILIES):
        model = build_hf_moe_model(family, seed=seed)
        root = tmp_path_factory.mktemp(family)
        model.save_pretrained(root / "hf")
        out[family] = (model, root / "hf", flare_jax.convert_hf(root / "hf", root / "ckpt"))
    return out


def moe_config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**TINY_NEXT, "model_type": QWEN3_NEXT, **overrides})


@pytest.mark.parametrize("backend", ["reference", "gpu_interpret"])
def test_grouped_experts_equal_dense_reference(backend):
    """Outputs, router loss and all parameter gradients of the grouped path (``ragged_dot``, or
    the Pallas GPU kernels in interpret mode) == the dense per-expert oracle, with padding tokens
    masked out of the loss."""
    config = moe_config(norm_topk_prob=True)
    moe = SparseMoE(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                    backend=backend)
    x = jax.random.normal(jax.random.key(1), (2, 11, config.hidden_size))
    mask = jnp.arange(11)[None, :] < jnp.array([[11], [6]])
    graphdef, params = nnx.split(moe)

    def run(params, method):
        out, stats = getattr(nnx.merge(graphdef, params), method)(x, mask)
        aux = load_balancing_loss(stats)
        return jnp.sum(out * jnp.cos(out)) + aux, (out, aux)

    grads, results = {}, {}
    for method in ("__call__", "dense_reference"):
        grads[method], results[method] = jax.jit(jax.grad(run, has_aux=True), static_argnums=1)(
            params, method)
    (out, aux), (ref_out, ref_aux) = results["__call__"], results["dense_reference"]
    assert np.abs(out - ref_out).max() <= 1e-5
    assert abs(float(aux) - float(ref_aux)) <= 1e-6
    for (path, g), (_, g_ref) in zip(jax.tree.leaves_with_path(grads["__call__"]),
                                     jax.tree.leaves_with_path(grads["dense_reference"]),
                                     strict=True):
        assert np.abs(g - g_ref).max() <= 1e-5, jax.tree_util.keystr(path)
    assert float(np.abs(grads["__call__"]["gate"]["kernel"][...]).max()) > 0  # router is trained


def test_router_loss_equals_hf_formula():
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2 * 9, 8)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0
    routing = route(jnp.asarray(logits), top_k=3, normalize=True)
    np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-6)
    raw = route(jnp.asarray(logits), top_k=3, normalize=False)
    np.testing.assert_allclose(raw.weights, np.sort(raw.probs, -1)[:, ::-1][:, :3], rtol=1e-6)
    for token_mask, hf_mask in ((None, None), (mask.reshape(-1), torch.as_tensor(mask))):
        stats = router_stats(routing, None if token_mask is None else jnp.asarray(token_mask))
        theirs = load_balancing_loss_func((torch.as_tensor(logits),), 8, 3, hf_mask)
        assert abs(float(load_balancing_loss(stats)) - float(theirs)) <= 1e-6
    # Two layers: HF pools the layers' counts and probabilities before the product (not a mean
    # of per-layer losses); summed statistics give the same.
    layers = (logits, 3.0 * rng.normal(size=logits.shape).astype(np.float32))
    per_layer = [router_stats(route(jnp.asarray(x), 3, True)) for x in layers]
    theirs = float(load_balancing_loss_func(tuple(map(torch.as_tensor, layers)), 8, 3))
    assert abs(float(load_balancing_loss(jax.tree.map(jnp.add, *per_layer))) - theirs) <= 1e-6
    mean_of_layers = np.mean([float(load_balancing_loss(stats)) for stats in per_layer])
    assert abs(mean_of_layers - theirs) > 1e-3  # the two conventions really differ here
    # Perfectly balanced routing gives k; no tokens give 0.
    balanced = router_stats(route(jnp.zeros((4, 8)), 2, True))
    assert float(load_balancing_loss(balanced)) == pytest.approx(2.0)
    assert float(load_balancing_loss(RouterStats.zeros(8))) == 0.0


def assert_no_router_ties(hf_model, tokens: np.ndarray) -> None:
    with torch.no_grad():
        router_logits = hf_model(torch.as_tensor(tokens), use_cache=False,
                                 output_router_logits=True).router_logits
    k = hf_model.config.num_experts_per_tok
    for layer in router_logits:
        top = torch.topk(torch.softmax(layer, -1), k + 1, dim=-1).values
        assert float((top[:, k - 1] - top[:, k]).min()) > MIN_ROUTER_MARGIN


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(families, family):
    hf_model, _, ckpt = families[family]
    model = flare_jax.load(ckpt, dtype="float32")
    assert model.config.model_type == {"qwen3_next": QWEN3_NEXT, "qwen3_5_moe": QWEN3_5_MOE}[family]
    # 75 tokens: not a multiple of the 64-token chunk of the gated delta rule.
    tokens = np.random.default_rng(3).integers(2, hf_model.config.vocab_size, size=(2, 75))
    assert_no_router_ties(hf_model, tokens)
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(tokens), use_cache=False).logits.numpy()
    assert np.abs(model.logits(tokens) - theirs).max() <= ATOL


def test_model_router_loss_equals_hf_aux_loss(families):
    """The causal call's router statistics, summed over the layers (Qwen3-Next: sparse layers 0
    and 1; the dense layer 2 adds nothing), give HF's ``aux_loss`` with right padding masked out.
    Tolerance 1e-5: the routers see hidden states that agree with HF's to ~1e-6 and the top-k
    choices are the same (no near-ties), so only the mean probabilities differ, by ~1e-7."""
    hf_model, _, ckpt = families["qwen3_next"]
    model = flare_jax.load(ckpt, dtype="float32")
    tokens = np.random.default_rng(5).integers(2, hf_model.config.vocab_size, size=(2, 20))
    mask = np.ones(tokens.shape, bool)
    mask[1, 13:] = False
    assert_no_router_ties(hf_model, tokens)
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask).long(),
                          use_cache=False, output_router_logits=True).aux_loss
    _, _, stats = model.module(jnp.asarray(tokens), token_mask=jnp.asarray(mask),
                               with_router_stats=True)
    assert float(stats.tokens) == 2 * mask.sum()  # two sparse layers, padding out
    assert abs(float(load_balancing_loss(stats)) - float(theirs)) <= 1e-5


def test_greedy_generation_equals_hf_generate(families):
    """Qwen3-Next (sparse and dense MLP layers, fused projections, unnormalised routing) decoded
    with caches; one family keeps the file fast, the decoding path does not depend on it."""
    hf_model, _, ckpt = families["qwen3_next"]
    sampler = flare_jax.Sampler.load(ckpt)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(2, hf_model.config.vocab_size, size=n).tolist() for n in (5, 12)]
    results = sampler.generate(prompts, max_new_tokens=10)
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=hf_model.config.eos_token_id, pad_token_id=0)
        assert result.tokens == out[0, len(prompt):].tolist()


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("family, dtype", [("qwen3_next", torch.float32),
                                           ("qwen3_5_moe", torch.bfloat16)])
def test_round_trip_is_bit_identical(families, tmp_path, family, dtype):
    """HF -> flare-jax -> HF gives the same tensors bit for bit (per-expert tensors, Qwen3-Next's
    fused projections) and a checkpoint transformers loads with identical logits."""
    shared, _, _ = families[family]
    hf_model = copy.deepcopy(shared).to(dtype)
    hf_model.save_pretrained(tmp_path / "hf")
    ckpt = flare_jax.convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    back = flare_jax.export_hf(ckpt, tmp_path / "back", max_shard_bytes=256 * 1024)
    original, exported = all_tensors(tmp_path / "hf"), all_tensors(back)
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == [type(hf_model).__name__]
    # The export and the original load into identical models. Parameters are moved to fresh
    # memory first: transformers maps safetensors files, and the tensors' offsets in the two files
    # differ, which changes CPU kernel paths at the 1e-7 level.
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8]])
    logits = []
    for directory in (back, tmp_path / "hf"):
        loaded = type(hf_model).from_pretrained(directory, dtype=dtype).eval()
        with torch.no_grad():
            for param in loaded.parameters():
                param.data = param.data.clone()
            logits.append(loaded(tokens, use_cache=False).logits)
    assert torch.equal(*logits)


def test_vision_language_moe_layout_converts_like_text(families, tmp_path):
    """Qwen3.5-MoE's released class nests the text weights under model.language_model and the
    config under text_config: it converts to the same parameters as the text-only checkpoint."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text_model, _, text_ckpt = families["qwen3_5_moe"]
    vlm = vlm_from_text(Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, TINY_MOE,
                        text_model)
    vlm.save_pretrained(tmp_path / "vlm")
    ckpt = flare_jax.convert_hf(tmp_path / "vlm", tmp_path / "ckpt")
    ours = flare_jax.load(ckpt, dtype="float32")
    reference = flare_jax.load(text_ckpt, dtype="float32")
    assert ours.config == reference.config
    for a, b in zip(jax.tree.leaves(nnx.state(ours.module, nnx.Param)),
                    jax.tree.leaves(nnx.state(reference.module, nnx.Param)), strict=True):
        assert np.array_equal(a, b)


def expert_parallel_worker(out: Path) -> None:
    """Run in a subprocess with 4 CPU devices: the MoE loss and gradients with parameters sharded
    by the training rules on a ``(data 1, fsdp 2, expert 2, tensor 1)`` mesh, batch over fsdp x
    expert, against one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from flare_jax.train import sharding
    from flare_jax.train.step import abstract_params

    config = moe_config()
    moe = SparseMoE(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)
    params = state.to_pure_dict()
    x = jax.random.normal(jax.random.key(1), (4, 6, config.hidden_size))
    mask = jnp.arange(6)[None] < jnp.array([[6], [3], [6], [5]])

    def loss(params, x, mask):
        bound = jax.tree.map(lambda v: v, state)
        bound.replace_by_pure_dict(params)
        out, stats = nnx.merge(graphdef, bound)(x, mask)
        return jnp.sum(out * jnp.cos(out)) + load_balancing_loss(stats)

    fn = jax.value_and_grad(loss)
    ref_loss, ref_grads = jax.jit(fn)(params, x, mask)
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2, 2, 1), ("data", "fsdp", "expert", "tensor"))
    every = sharding.param_shardings(abstract_params(config), mesh)  # a rule for every parameter
    shardings = sharding.param_shardings({"layers": {"0": {"mlp": params}}}, mesh)
    shardings = shardings["layers"]["0"]["mlp"]
    rows = NamedSharding(mesh, PartitionSpec(("fsdp", "expert")))
    args = jax.device_put(params, shardings), jax.device_put(x, rows), jax.device_put(mask, rows)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step traces
        lowered = jax.jit(fn, in_shardings=(shardings, rows, rows)).lower(*args)
    got_loss, grads = lowered.compile()(*args)
    out.write_text(json.dumps({
        "all_to_all": lowered.as_text().count("all_to_all"),
        "loss_diff": float(abs(got_loss - ref_loss)),
        "grad_diff": max(float(jnp.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)),
        "expert_spec": str(every["layers"]["0"]["mlp"]["experts"]["down_proj"].spec),
        "grad_spec": str(grads["experts"]["gate_proj"].sharding.spec),
    }))


def test_expert_parallel_equals_one_device(tmp_path):
    """Experts sharded over an ``expert`` mesh axis (4 CPU devices, in a subprocess): the token
    copies travel to their experts' devices and back (all-to-all, forward and backward), with the
    same loss and gradients as one device within 1e-6 (fp32; only reduction order differs)."""
    result = run_with_devices(__file__, 4, tmp_path / "result.json")
    assert result["all_to_all"] >= 4, result  # copies, expert ids and results, and back
    assert result["loss_diff"] <= 1e-6 and result["grad_diff"] <= 1e-6
    assert result["expert_spec"] == "P('expert', None, 'fsdp')"
    assert result["grad_spec"].startswith("P('expert'")  # expert gradients stay split


def test_config_parsing_and_round_trip():
    nxt = moe_config()
    assert nxt.moe_layers == (True, True, False)
    assert (nxt.num_experts, nxt.num_experts_per_tok, nxt.norm_topk_prob) == (8, 2, False)
    moe = ModelConfig.from_hf_dict({"model_type": "qwen3_5_moe", "text_config": {
        **TINY_MOE, "model_type": QWEN3_5_MOE}})
    assert moe.model_type == QWEN3_5_MOE and moe.intermediate_size == 0
    assert moe.moe_layers == (True,) * 3 and moe.norm_topk_prob
    for config in (nxt, moe):
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # Checkpoints written before the MoE fields existed still load as the dense family.
    dense = {k: v for k, v in nxt.to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "layer_types")}
    assert ModelConfig.from_dict(dense).num_experts == 0
    # Qwen3-Next has a dense MLP field (used by mlp_only_layers); Qwen3.5-MoE does not.
    with pytest.raises(ConfigError, match=r"missing required fields \['intermediate_size'\]"):
        ModelConfig.from_hf_dict({k: v for k, v in TINY_NEXT.items() if k != "intermediate_size"}
                                 | {"model_type": QWEN3_NEXT})


@pytest.mark.parametrize("edit, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok' \(9\) must be in \[1, num_experts=8\]"),
    (dict(mlp_only_layers=[3]), r"mlp_only_layers' holds \[3\]"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step' must be a positive"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size' must be positive"),
    (dict(model_type="qwen3_5_moe", text_config={**TINY_MOE, "model_type": "qwen3_next"}),
     "text_config.model_type is 'qwen3_next'"),
])
def test_config_errors(edit, match):
    with pytest.raises(ConfigError, match=match):
        moe_config(**edit)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    expert_parallel_worker(Path(sys.argv[1]))
