"""The jitted train step: FLARE forward on ``[clean ; noisy]``, token-balanced loss (plus the
router load-balancing loss of mixture-of-experts models), gradient accumulation over
micro-batches, AdamW update; parameters and optimizer state sharded by the logical rules. A plain
causal step of the same model is provided as a baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flare_jax.checkpoint import Nested, flatten
from flare_jax.config import ModelConfig
from flare_jax.layout import FlareLayout
from flare_jax.model.hybrid import HybridLM
from flare_jax.model.moe import RouterStats, load_balancing_loss
from flare_jax.objective import (
    CrossEntropy,
    LossConfig,
    NoiseConfig,
    add_noise,
    flare_loss,
    head_cross_entropy,
    per_token,
    token_cross_entropy,
)
from flare_jax.pretrained import module_params
from flare_jax.train import sharding

Batch = dict[str, jax.Array]  # tokens, segment_ids, loss_mask: [B, L]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Step counter, fp32 parameters (nested string-keyed dict) and optimizer state."""

    step: jax.Array
    params: Nested
    opt_state: Any


class ModelBinder:
    """Builds a :class:`HybridLM` around a parameter dict inside a traced function."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, backend: str):
        self.config = config
        self.backend = backend
        abstract = nnx.eval_shape(lambda: HybridLM(config, dtype=dtype, param_dtype=jnp.float32,
                                                   rngs=nnx.Rngs(0), backend=backend))
        self.graphdef, state = nnx.split(abstract)
        self._flat = list(nnx.to_flat_state(state))

    def __call__(self, params: Nested) -> HybridLM:
        given = flatten(params)
        flat = [(path, var.replace(given[tuple(str(p) for p in path)]))
                for path, var in self._flat]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def abstract_params(config: ModelConfig) -> Nested:
    """Shapes and dtypes (fp32) of the parameters of ``config``."""
    return jax.eval_shape(lambda: module_params(HybridLM(config, param_dtype=jnp.float32,
                                                         rngs=nnx.Rngs(0))))


def state_shardings(tx: optax.GradientTransformation, params: Nested, mesh: Mesh) -> TrainState:
    """Shardings of the train state: optimizer moments follow their parameters."""
    param_sh = sharding.param_shardings(params, mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh)


def init_state(tx: optax.GradientTransformation, params: Nested, mesh: Mesh) -> TrainState:
    """Step 0 state around ``params`` (already sharded), optimizer state in its shardings."""
    shardings = state_shardings(tx, params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step computes."""

    block_size: int
    noise: NoiseConfig
    loss: LossConfig
    grad_accum: int = 1
    remat: str = "none"  # what each decoder layer keeps for the backward pass (layer_scan)
    scan_layers: bool = True  # one lax.scan over repeated layer groups (same numbers, fast compile)
    objective: str = "flare"  # or "causal": the plain AR baseline on the clean row only
    # cross-entropy over vocabulary chunks of this many tokens, never holding the [B, L, V]
    # logits (flare_jax.vocab_ce); 0: from full fp32 logits
    vocab_chunk: int = 8192
    # > 0: instead, the cross-entropy runs over steps of about this many tokens with the whole
    # vocabulary, its gradients formed in the forward pass (flare_jax.token_ce)
    token_chunk: int = 0
    # what the head matmul stores with token_chunk > 0: "float32" or "bfloat16" (half the bytes of
    # the logsumexp and d_logits passes; the softmax stays fp32)
    logits_dtype: str = "float32"


def _micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """``[B, ...] -> [accum, B / accum, ...]``; micro-batch ``i`` holds rows ``i::accum`` so that
    every data shard contributes to each micro-batch."""
    rows = x.shape[0] // accum
    return jnp.swapaxes(x.reshape(rows, accum, *x.shape[1:]), 0, 1)


def _causal_loss(outputs: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                 segment_ids: jax.Array, cross_entropy: CrossEntropy
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    valid = (segment_ids[:, :-1] == segment_ids[:, 1:]) & loss_mask[:, 1:].astype(bool)
    n = jnp.sum(valid, dtype=jnp.float32)
    mean, _ = cross_entropy([(outputs[:, :-1], tokens[:, 1:], valid / jnp.maximum(n, 1.0))])
    return mean, {"loss": mean, "ar_loss": mean, "ar_tokens": n,
                  "diffusion_loss": jnp.zeros(()), "diffusion_tokens": jnp.zeros(())}


def make_train_step(binder: ModelBinder, tx: optax.GradientTransformation, cfg: StepConfig,
                    mesh: Mesh, shardings: TrainState, seed: int
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``(state, batch) -> (state, metrics)``; ``state`` is donated.

    Noise is drawn from ``fold_in(key(seed), step)`` over the whole global batch (independent of
    the mesh and of ``grad_accum``). Gradients of the micro-batches are summed unnormalised and
    divided by the batch's total loss weight, so accumulation reproduces the full-batch loss.

    Mixture-of-experts models add ``loss.router_aux_weight * aux`` (metric ``router_aux_loss``),
    ``aux`` being HF's load-balancing loss over the loss tokens (``loss_mask``; padding and
    prompts out) of every sparse layer, of both streams with the FLARE objective. ``aux`` is a
    product of two batch means, not a sum over tokens: the micro-batches' router statistics are
    summed, so the reported ``router_aux_loss`` and ``loss`` are the full-batch values for any
    ``grad_accum``. Its gradient needs the whole batch's expert counts before any backward pass,
    so each micro-batch differentiates its own ``aux`` weighted by its share of the loss weight:
    exact without accumulation, the token-weighted mean of the micro-batch gradients with it
    (what HF's Trainer does; it differs from the full-batch gradient only by how much the
    experts' loads vary between micro-batches). Weight 0 leaves the gradients of the plain loss.
    """
    w_ar, w_diff = cfg.loss.ar_weight, cfg.loss.diffusion_weight
    w_router = cfg.loss.router_aux_weight
    num_experts = binder.config.num_experts

    def constrain(h: jax.Array) -> jax.Array:
        return sharding.constrain(h, "hidden", mesh)

    def micro_loss(params: Nested, micro: Batch) -> tuple[jax.Array, tuple]:
        model = binder(params)
        tokens, segment_ids, loss_mask = micro["tokens"], micro["segment_ids"], micro["loss_mask"]
        router_mask = loss_mask.astype(bool)
        # through the head: the model returns normed hidden states, not logits
        chunked = cfg.vocab_chunk > 0 or cfg.token_chunk > 0
        cross_entropy = (head_cross_entropy(*model.head_weight(), vocab_chunk=cfg.vocab_chunk,
                                            token_chunk=cfg.token_chunk,
                                            logits_dtype=cfg.logits_dtype,
                                            backend=binder.backend) if chunked
                         else per_token(token_cross_entropy))
        if cfg.objective == "causal":
            outputs, _, stats = model(tokens, segment_ids, scan_layers=cfg.scan_layers,
                                      token_mask=router_mask, with_router_stats=True,
                                      normed_hidden=chunked, remat=cfg.remat,
                                      constrain=constrain)
            mean, metrics = _causal_loss(outputs, tokens, loss_mask, segment_ids, cross_entropy)
            weight = metrics["ar_tokens"]
        else:
            layout = FlareLayout.from_segments(segment_ids, cfg.block_size)
            clean, noisy, stats = model.flare(
                tokens, micro["noisy"], layout, remat=cfg.remat, constrain=constrain,
                scan_layers=cfg.scan_layers, token_mask=router_mask, with_router_stats=True,
                normed_hidden=chunked)
            mean, metrics = flare_loss(clean, noisy, tokens, micro["noise_mask"], loss_mask,
                                       segment_ids, micro["rate"], cfg.loss, cross_entropy)
            weight = w_ar * metrics["ar_tokens"] + w_diff * metrics["diffusion_tokens"]
        weight = jax.lax.stop_gradient(weight)
        objective = mean
        if stats is not None and w_router > 0:
            objective = objective + w_router * load_balancing_loss(stats)
        return objective * weight, (metrics, weight, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = dict(batch)
        if cfg.objective == "flare":
            layout = FlareLayout.from_segments(batch["segment_ids"], cfg.block_size)
            rng = jax.random.fold_in(jax.random.key(seed), state.step)
            batch["noisy"], batch["noise_mask"], batch["rate"] = add_noise(
                rng, batch["tokens"], layout, batch["loss_mask"].astype(bool), cfg.noise)
        micro = {k: _micro_batches(v, cfg.grad_accum) for k, v in batch.items()}

        def accumulate(carry, mb):
            grads, total, ar_sum, diff_sum, counts, router = carry
            (_, (metrics, weight, stats)), g = grad_fn(state.params, mb)
            grads = jax.tree.map(jnp.add, grads, g)
            counts = counts + jnp.stack([metrics["ar_tokens"], metrics["diffusion_tokens"], weight])
            ar_sum = ar_sum + metrics["ar_loss"] * metrics["ar_tokens"]
            diff_sum = diff_sum + metrics["diffusion_loss"] * metrics["diffusion_tokens"]
            router = jax.tree.map(jnp.add, router, stats)
            return (grads, total + metrics["loss"] * weight, ar_sum, diff_sum, counts, router), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        router = RouterStats.zeros(num_experts) if num_experts else None
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jnp.zeros(3), router)
        (grads, total, ar_sum, diff_sum, counts, router), _ = jax.lax.scan(accumulate, init, micro)
        denominator = jnp.maximum(counts[2], 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = total / denominator
        extra = {}
        if router is not None:
            extra["router_aux_loss"] = load_balancing_loss(router)
            loss = loss + w_router * extra["router_aux_loss"]
        metrics = {
            "loss": loss,
            "ar_loss": ar_sum / jnp.maximum(counts[0], 1.0),
            "ar_tokens": counts[0],
            "diffusion_loss": diff_sum / jnp.maximum(counts[1], 1.0),
            "diffusion_tokens": counts[1],
            "grad_norm": optax.tree.norm(grads),
            **extra,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    def step_on_mesh(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # kernels per shard (flare_jax.ops)
            return step(state, batch)

    return jax.jit(step_on_mesh, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
