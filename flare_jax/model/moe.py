"""Sparse mixture-of-experts MLP of Qwen3-Next / Qwen3.5-MoE: softmax router, top-k routed SwiGLU
experts and a shared SwiGLU expert scaled by a sigmoid gate.

The routed experts run as grouped matmuls (:func:`flare_jax.ops.grouped_matmul`: ``ragged_dot``, a
Pallas kernel on the GPU) over the token copies sorted by
expert: each token is repeated ``k`` times, the copies are ordered by expert id, and expert ``e``
multiplies the contiguous run of its copies by its own weights. Operands are in the compute dtype,
accumulation in fp32. :meth:`SparseMoE.dense_reference` evaluates every expert on every token and
serves as the oracle of the grouped path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import ops
from flare_jax.config import ModelConfig
from flare_jax.model.layers import Dense, Dtype, SwiGLU, matmul_precision


class Routing(NamedTuple):
    """The router's decision for ``N`` tokens."""

    logits: jax.Array  # [N, E] fp32
    probs: jax.Array  # [N, E] fp32 softmax
    weights: jax.Array  # [N, k] fp32 combine weights of the chosen experts
    experts: jax.Array  # [N, k] int32 chosen expert ids (descending probability)


def route(logits: jax.Array, top_k: int, normalize: bool) -> Routing:
    """Softmax over experts, top-``k``, optionally renormalised to sum to 1 per token."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, probs, weights, experts.astype(jnp.int32))


class RouterStats(NamedTuple):
    """Sums behind the load-balancing loss; they add up (``jax.tree.map(jnp.add, ...)``) over
    layers, streams and micro-batches."""

    slots: jax.Array  # [E] fp32: top-k slots given to each expert
    probs: jax.Array  # [E] fp32: router probabilities of each expert
    tokens: jax.Array  # [] fp32: routed tokens

    @classmethod
    def zeros(cls, num_experts: int) -> RouterStats:
        """No tokens routed (a dense layer's share)."""
        return cls(jnp.zeros((num_experts,), jnp.float32), jnp.zeros((num_experts,), jnp.float32),
                   jnp.zeros((), jnp.float32))


def router_stats(routing: Routing, token_mask: jax.Array | None = None) -> RouterStats:
    """The sums of ``routing`` over the tokens where ``token_mask [N]`` is True (all by default);
    the slot counts come from the top-k choice and carry no gradient."""
    num_experts = routing.probs.shape[-1]
    mask = (jnp.ones(routing.probs.shape[:1], jnp.float32) if token_mask is None
            else token_mask.astype(jnp.float32))
    slots = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    return RouterStats(jnp.sum(slots * mask[:, None], axis=0),
                       jnp.sum(routing.probs * mask[:, None], axis=0), jnp.sum(mask))


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch-Transformer auxiliary loss as Qwen computes it: ``E * sum_e f_e * P_e`` with ``f_e``
    the top-k slots given to expert ``e`` per token and ``P_e`` the mean router probability of
    ``e``, both averaged over every routed token of every layer summed into ``stats`` (HF pools
    the layers before the product, it does not average per-layer losses); ``k`` at perfect
    balance (HF counts every top-k slot), 0 with no tokens."""
    count = jnp.maximum(stats.tokens, 1.0)
    return stats.slots.shape[0] * jnp.sum((stats.slots / count) * (stats.probs / count))


class Experts(nnx.Module):
    """``E`` SwiGLU experts as stacked weights: ``gate_proj``/``up_proj [E, hidden, I]`` and
    ``down_proj [E, I, hidden]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs, backend: str = "auto"):
        self.dtype = dtype
        self.backend = backend

        def init(shape: tuple[int, ...]) -> nnx.Param:
            return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, param_dtype))

        self.gate_proj = init((num_experts, hidden, intermediate))
        self.up_proj = init((num_experts, hidden, intermediate))
        self.down_proj = init((num_experts, intermediate, hidden))

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj,
                                                         self.down_proj))

    def grouped(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        """``sum_j weights[..., j] * expert_{experts[..., j]}(x[...])`` for ``x [B, T, hidden]``
        (``experts`` / ``weights [B, T, k]``) via grouped matmuls over the token copies sorted by
        expert, per batch shard under a mesh (:func:`flare_jax.ops.routed_experts`). fp32."""
        backend, dtype = self.backend, self.dtype

        def run(x, experts, weights, params, axis):
            flat = (x.reshape(-1, x.shape[-1]), experts.reshape(-1, experts.shape[-1]),
                    weights.reshape(-1, weights.shape[-1]), params, dtype, backend)
            out = (grouped_experts(*flat) if axis is None
                   else expert_parallel_experts(*flat, axis=axis))
            return out.reshape(*x.shape[:-1], out.shape[-1])

        return ops.routed_experts(run, x, experts, weights, self._weights())

    def dense(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        """:meth:`grouped` of flat tokens ``x [N, hidden]`` by running every expert on every token
        (the oracle)."""
        w_gate, w_up, w_down = self._weights()
        prec = matmul_precision(self.dtype)
        x = x.astype(self.dtype)

        def mm(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
            return jnp.einsum(spec, lhs, rhs, precision=prec, preferred_element_type=jnp.float32)

        act = (jax.nn.silu(mm("nh,ehi->eni", x, w_gate)) * mm("nh,ehi->eni", x, w_up))
        ys = mm("eni,eih->enh", act.astype(self.dtype), w_down)  # [E, N, hidden]
        combine = jnp.sum(jax.nn.one_hot(experts, w_gate.shape[0], dtype=jnp.float32)
                          * weights.astype(jnp.float32)[..., None], axis=1)  # [N, E]
        return jnp.einsum("enh,ne->nh", ys, combine)


ExpertParams = tuple[jax.Array, jax.Array, jax.Array]


def _swiglu_rows(rows: jax.Array, group_sizes: jax.Array, params: ExpertParams, dtype: Dtype,
                 backend: str) -> jax.Array:
    """The SwiGLU experts of ``rows [R, hidden]`` sorted by expert (``group_sizes [E]``, rows past
    their sum give zeros) with ``params`` = (gate, up ``[E, hidden, I]``, down ``[E, I, hidden]``).
    Returns fp32 ``[R, hidden]``."""
    w_gate, w_up, w_down = params
    prec = matmul_precision(dtype)

    def mm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return ops.grouped_matmul(lhs, rhs, group_sizes, precision=prec, backend=backend)

    act = (jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)).astype(dtype)
    return mm(act, w_down)


def _sort_by_expert(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The order that sorts ``ids`` (stable) and the size of every expert's run; ids equal to
    ``num_experts`` (padding) sort last and belong to no run."""
    order = jnp.argsort(ids, stable=True)
    return order, jnp.bincount(ids, length=num_experts + 1)[:num_experts].astype(jnp.int32)


def _unsort(rows: jax.Array, order: jax.Array) -> jax.Array:
    """Rows given in the order ``order`` sorted them, back in their original order."""
    return jnp.zeros_like(rows).at[order].set(rows)


def _combine(copies: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_j weights[n, j] * copy[n, j]`` from the expert outputs of the ``N * k`` token copies
    ``[N*k, hidden]`` in the sorted ``order``; fp32 ``[N, hidden]``."""
    n, k = weights.shape
    unsorted = _unsort(copies, order).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", unsorted, weights.astype(jnp.float32))


def grouped_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, params: ExpertParams,
                    dtype: Dtype, backend: str) -> jax.Array:
    """The routed SwiGLU experts of tokens ``x [N, hidden]``, ``experts`` / ``weights [N, k]``:
    each token is repeated ``k`` times, the copies are sorted by expert and every expert
    multiplies its contiguous run (:func:`flare_jax.ops.grouped_matmul`). Returns fp32
    ``[N, hidden]``."""
    k = experts.shape[1]
    order, group_sizes = _sort_by_expert(experts.reshape(-1), params[0].shape[0])
    xs = jnp.take(x.astype(dtype), order // k, axis=0)  # [N*k, hidden] sorted by expert
    return _combine(_swiglu_rows(xs, group_sizes, params, dtype, backend), order, weights)


def expert_parallel_experts(x: jax.Array, experts: jax.Array, weights: jax.Array,
                            params: ExpertParams, dtype: Dtype, backend: str,
                            axis: str) -> jax.Array:
    """:func:`grouped_experts` inside ``shard_map`` with the experts split over mesh ``axis``:
    this device holds experts ``[d * E_l, (d + 1) * E_l)`` (``params`` ``[E_l, ...]``). Token
    copies go to the device of their expert (``all_to_all``), are multiplied there with the
    copies every other device sent, and come back; no copy is dropped (each destination has room
    for all ``N * k`` copies of a device), so the result equals the single-device one."""
    n, k = experts.shape
    local_experts = params[0].shape[0]
    devices = jax.lax.psum(1, axis)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by global expert: by destination, then local expert
    dest = (flat // local_experts)[order]
    counts = jnp.bincount(dest, length=devices)
    slot = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest]
    send = jnp.zeros((devices, n * k, x.shape[-1]), dtype).at[dest, slot].set(
        jnp.take(x.astype(dtype), order // k, axis=0))
    send_ids = jnp.full((devices, n * k), local_experts, jnp.int32).at[dest, slot].set(
        flat[order] % local_experts)
    rows = jax.lax.all_to_all(send, axis, 0, 0).reshape(-1, x.shape[-1])  # [source * N*k, hidden]
    ids = jax.lax.all_to_all(send_ids, axis, 0, 0).reshape(-1)
    local_order, group_sizes = _sort_by_expert(ids, local_experts)
    ys = _unsort(_swiglu_rows(rows[local_order], group_sizes, params, dtype, backend),
                 local_order).reshape(devices, n * k, -1)
    copies = jax.lax.all_to_all(ys, axis, 0, 0)[dest, slot]  # back, in the sorted copy order
    return _combine(copies, order, weights)


class SparseMoE(nnx.Module):
    """Router ``gate`` (fp32 logits) -> top-k routed experts + ``sigmoid(shared_expert_gate(x)) *
    shared_expert(x)``. Calls return ``(output, router statistics)``; :func:`load_balancing_loss`
    turns the statistics (summed over layers) into the auxiliary loss."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 backend: str = "auto"):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.top_k = c.num_experts_per_tok
        self.normalize = c.norm_topk_prob
        self.gate = Dense(c.hidden_size, c.num_experts, **kw)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, **kw,
                               backend=backend)
        self.shared_expert = SwiGLU(c.hidden_size, c.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = Dense(c.hidden_size, 1, **kw)

    def router(self, x: jax.Array) -> Routing:
        """Routing of ``x [N, hidden]``; the logits are computed and kept in fp32."""
        logits = jnp.einsum("nh,he->ne", x.astype(jnp.float32),
                            self.gate.kernel[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return route(logits, self.top_k, self.normalize)

    def _forward(self, x: jax.Array, token_mask: jax.Array | None, dense: bool
                 ) -> tuple[jax.Array, RouterStats]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat)
        if dense:
            routed = self.experts.dense(flat, routing.experts, routing.weights)
        else:
            # [rows, tokens, ...]: the leading axis is what a mesh splits
            lead = (-1, shape[-2]) if x.ndim > 2 else (1, -1)
            routed = self.experts.grouped(
                x.reshape(*lead, shape[-1]), routing.experts.reshape(*lead, self.top_k),
                routing.weights.reshape(*lead, self.top_k)).reshape(-1, shape[-1])
        shared_gate = jax.nn.sigmoid(self.shared_expert_gate(flat).astype(jnp.float32))
        out = routed + shared_gate * self.shared_expert(flat).astype(jnp.float32)
        mask = None if token_mask is None else token_mask.reshape(-1)
        return out.astype(self.dtype).reshape(shape), router_stats(routing, mask)

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, RouterStats]:
        """``x [..., hidden]`` -> (output like ``x`` in the compute dtype, router statistics of
        the tokens where ``token_mask [...]`` is True)."""
        return self._forward(x, token_mask, dense=False)

    def dense_reference(self, x: jax.Array, token_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, RouterStats]:
        """:meth:`__call__` with every expert evaluated on every token (test oracle)."""
        return self._forward(x, token_mask, dense=True)
