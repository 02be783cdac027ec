"""Weighted cross-entropy through the LM head over chunks of positions, its gradients formed in
the forward pass.

The loss weight of every token is an input, so the forward pass can finish the work at once:
each step takes ``C`` positions of every row (about ``chunk_tokens`` tokens in all), forms their
logits over the whole vocabulary ``[B, C, V]`` (fp32 accumulation, stored in ``logits_dtype``:
fp32, or bf16 to halve the bytes of the pass over them), and then in one read of them
(:func:`flare_jax.ops.vocab_softmax`) their logsumexp, the cross-entropy in fp32 and the
gradient terms ``exp(logits - offset)`` (compute dtype, one offset per row, the target column
replaced so that ``softmax - onehot = norm * exp``). With ``d_logits = w norm * exp``, the
row factor ``w norm`` scales the rows of ``d_hidden = exp @ W`` after the matmul, and those of
``hidden`` inside the step's share of ``d_weight = exp^T @ (w norm hidden)`` (fp32
accumulation); ``d_logits`` itself is never written. The backward pass only scales the two
gradients by the cotangent of the weighted sum. Three matmuls with the head per token instead of
the four of :mod:`flare_jax.vocab_ce`, whose backward recomputes the logits. The one step's
``[B, C, V]`` logits and exponentials are the largest buffers (4 GiB each in fp32 at 4096 tokens
x 248320 ids); ``d_weight`` is held in fp32 from the forward pass to the backward pass.

Positions are chunked within rows, so a batch sharded over rows stays sharded in every step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flare_jax.ops import vocab_softmax
from flare_jax.vocab_ce import matmul_precision


def weighted_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                           token_weights: jax.Array, *, vocab_major: bool,
                           chunk_tokens: int = 4096, logits_dtype: jnp.dtype = jnp.float32,
                           backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """``(sum(token_weights * ce), ce)``, ``ce [B, L]`` the fp32 per-token
    ``-log softmax(hidden @ head)[target]``.

    ``logits_dtype``: what the head matmul stores (fp32 accumulation either way). bf16 rounds
    each logit to 8 significant bits (relative error up to 2^-9) before the fp32 softmax, as the
    model's other matmul outputs are rounded; fp32 keeps them exact.

    ``hidden [B, L, H]`` (its dtype is the matmul dtype; fp32 runs full-precision matmuls),
    ``weight`` the head: ``[V, H]`` with ``vocab_major`` (a tied embedding), else ``[H, V]``;
    ``targets`` ids in ``[0, V)`` and ``token_weights`` (any float dtype), both ``[B, L]``. The
    sum is differentiable in ``hidden``, ``weight`` and ``token_weights``; ``ce`` is for metrics
    and carries no gradient (its own would need the logits again).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    logits_dtype = jnp.dtype(logits_dtype)
    if logits_dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"logits_dtype must be float32 or bfloat16, got {logits_dtype}")
    if (targets.ndim != 2 or hidden.shape[:2] != targets.shape
            or token_weights.shape != targets.shape):
        raise ValueError("expected hidden [B, L, H] with targets and token_weights [B, L], got "
                         f"{hidden.shape}, {targets.shape}, {token_weights.shape}")
    rows, length = targets.shape
    per_row = max(1, min(length, chunk_tokens // rows))
    static = _Static(vocab_major, per_row, logits_dtype, backend,
                     (jnp.dtype(hidden.dtype), jnp.dtype(weight.dtype)))
    total, ce = _weighted_ce(static, hidden, weight, targets.astype(jnp.int32),
                             token_weights.astype(jnp.float32))
    return total, jax.lax.stop_gradient(ce)


def _to_steps(x: jax.Array, per_row: int) -> jax.Array:
    """``[B, L, ...] -> [steps, B, per_row, ...]``, positions zero-padded to a whole step."""
    rows, length = x.shape[:2]
    steps = -(-length // per_row)
    x = jnp.pad(x, [(0, 0), (0, steps * per_row - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(rows, steps, per_row, *x.shape[2:]), 0, 1)


def _from_steps(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`_to_steps`."""
    steps, rows, per_row = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(rows, steps * per_row, *x.shape[3:])[:, :length]


class _Static(NamedTuple):
    """The static arguments of the custom VJP."""

    vocab_major: bool
    per_row: int  # positions of each row per step
    logits_dtype: jnp.dtype
    backend: str
    grad_dtypes: tuple[jnp.dtype, jnp.dtype]  # of hidden and weight


def _scan(static: _Static, hidden: jax.Array, weight: jax.Array, targets: jax.Array,
          token_weights: jax.Array, with_grads: bool
          ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``ce [B, L]`` and, ``with_grads``, the gradients of ``sum(token_weights * ce)`` for
    ``hidden`` (fp32, ``[B, L, H]``) and ``weight`` (fp32, its shape)."""
    head = weight.astype(hidden.dtype)
    precision = matmul_precision(hidden.dtype)
    w_dims = "vh" if static.vocab_major else "hv"
    per_row = static.per_row

    def step(d_weight, xs):
        h, t, w = xs  # [B, C, H], [B, C], [B, C]: padded positions have weight 0
        stored = jnp.einsum(f"bch,{w_dims}->bcv", h, head,
                            preferred_element_type=static.logits_dtype, precision=precision)
        terms = vocab_softmax(stored, t, exp_dtype=h.dtype if with_grads else None,
                              backend=static.backend)
        ce = terms.lse - terms.target_logit
        if not with_grads:
            return d_weight, (ce, None)
        # d_logits = w * (softmax - onehot) = w * norm * exp, with one norm per row and vocabulary
        # shard: it scales the rows of d_hidden and, inside the contraction, of h for d_weight
        scale = (w[..., None] * terms.norm)[..., None]  # [B, C, S, 1]
        shards = scale.shape[2]
        exp = terms.exp.reshape(*t.shape, shards, -1)  # [B, C, S, V / S]
        shard_dims = "svh" if static.vocab_major else "hsv"
        head_shards = (head.reshape(shards, -1, head.shape[1]) if static.vocab_major
                       else head.reshape(head.shape[0], shards, -1))
        d_h = jnp.einsum(f"bcsv,{shard_dims}->bcsh", exp, head_shards,
                         preferred_element_type=jnp.float32, precision=precision)
        d_h = jnp.sum(scale * d_h, axis=2)  # elementwise: no TF32 rounding
        # materialised, so that XLA keeps the head's cuBLAS matmul instead of fusing the scaling
        scaled_h = jax.lax.optimization_barrier(
            (scale * h[:, :, None, :]).astype(h.dtype))
        d_weight = d_weight + jnp.einsum(
            f"bcsv,bcsh->{shard_dims}", exp, scaled_h, preferred_element_type=jnp.float32,
            precision=precision).reshape(d_weight.shape)
        return d_weight, (ce, d_h)

    xs = (_to_steps(hidden, per_row), _to_steps(targets, per_row),
          _to_steps(token_weights, per_row))
    init = jnp.zeros(weight.shape, jnp.float32) if with_grads else None
    d_weight, (ce, d_hidden) = jax.lax.scan(step, init, xs)
    length = targets.shape[1]
    d_hidden = None if d_hidden is None else _from_steps(d_hidden, length)
    return _from_steps(ce, length), d_hidden, d_weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_ce(static: _Static, hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                 token_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    ce = _scan(static, hidden, weight, targets, token_weights, False)[0]
    return jnp.sum(token_weights * ce), ce


def _fwd(static, hidden, weight, targets, token_weights):
    ce, d_hidden, d_weight = _scan(static, hidden, weight, targets, token_weights, True)
    total = jnp.sum(token_weights * ce)
    return (total, ce), (d_hidden, d_weight, ce)


def _bwd(static, residuals, cotangents):
    hidden_dtype, weight_dtype = static.grad_dtypes
    d_hidden, d_weight, ce = residuals
    g = cotangents[0]  # that of ``ce`` is zero: the public function stops its gradient
    return ((g * d_hidden).astype(hidden_dtype), (g * d_weight).astype(weight_dtype), None,
            g * ce)


_weighted_ce.defvjp(_fwd, _bwd)
