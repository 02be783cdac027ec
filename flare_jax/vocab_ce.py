"""Cross-entropy through the LM head, chunked over the vocabulary: per-token
``logsumexp(h @ W) - (h @ W)[target]`` without materialising the ``[N, V]`` logits.

The forward pass loops over vocabulary chunks of ``C`` columns, keeping a running max, a running
sum of exponentials and the target logit per token (fp32); it saves only the hidden states, the
weight, the targets and the logsumexp ``[N]``. The backward pass recomputes each chunk's logits,
forms ``g * (softmax - onehot)`` and accumulates ``d_hidden`` and the chunk's rows of ``d_weight``
in fp32. Matmul operands are in the hidden states' dtype (bf16 in training; the weight is cast per
chunk), accumulation in fp32. A vocabulary that ``C`` does not divide ends with a chunk shifted
back to ``[V - C, V)`` whose columns already covered are masked out, so nothing is padded or
copied.

Peak extra memory: one chunk of logits ``[N, C]`` fp32 and ``d_weight`` in fp32, instead of the
``[N, V]`` fp32 logits and their gradient (8 GiB each for 8192 positions x 248320 tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flare_jax.logsumexp import max_sum_exp, merge_max_sum


def chunked_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *,
                          vocab_major: bool, chunk_size: int = 8192) -> jax.Array:
    """Per-token ``-log softmax(hidden @ head)[target]``, fp32, shaped like ``targets``.

    ``hidden [..., H]`` (its dtype is the matmul dtype; fp32 runs full-precision matmuls),
    ``weight`` the head: ``[V, H]`` with ``vocab_major`` (a tied embedding), else ``[H, V]``, any
    float dtype; ``targets [...]`` ids in ``[0, V)``. Differentiable in ``hidden`` and ``weight``
    (their gradients come back in their own dtypes).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    ce = _chunked_ce(vocab_major, chunk_size, flat, weight, targets.reshape(-1).astype(jnp.int32))
    return ce.reshape(targets.shape)


def _geometry(weight: jax.Array, vocab_major: bool, chunk_size: int) -> tuple[int, int, int]:
    vocab = weight.shape[0 if vocab_major else 1]
    chunk = min(chunk_size, vocab)
    return vocab, chunk, -(-vocab // chunk)


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """As the model's matmuls: full precision for fp32 (parity runs), the fast default else."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _chunk(hidden: jax.Array, weight: jax.Array, i: jax.Array, vocab_major: bool,
           chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Chunk ``i``: its first column ``start``, its weight rows ``[C, H]`` (compute dtype), its
    logits ``[N, C]`` fp32 (columns owned by an earlier chunk at ``-inf``) and their ids."""
    vocab, chunk, _ = _geometry(weight, vocab_major, chunk_size)
    start = jnp.minimum(i * chunk, vocab - chunk)
    rows = jax.lax.dynamic_slice_in_dim(weight, start, chunk, axis=0 if vocab_major else 1)
    rows = (rows if vocab_major else rows.T).astype(hidden.dtype)
    logits = jnp.einsum("nh,ch->nc", hidden, rows, preferred_element_type=jnp.float32,
                        precision=matmul_precision(hidden.dtype))
    ids = start + jnp.arange(chunk)
    logits = jnp.where(ids >= i * chunk, logits, -jnp.inf)
    return start, rows, logits, ids


def _forward(vocab_major: bool, chunk_size: int, hidden: jax.Array, weight: jax.Array,
             targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and logsumexp, fp32 ``[N]``."""
    _, _, n_chunks = _geometry(weight, vocab_major, chunk_size)

    def body(i, carry):
        running_max, running_sum, target_logit = carry
        _, _, logits, ids = _chunk(hidden, weight, i, vocab_major, chunk_size)
        # the chunk's max and sum of exponentials in one pass, merged into the running pair
        running_max, running_sum = merge_max_sum((running_max, running_sum), max_sum_exp(logits))
        # the target's column, unless an earlier chunk owns it (masked to -inf here)
        hit = (ids[None, :] == targets[:, None]) & (logits > -jnp.inf)
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return running_max, running_sum, target_logit

    n = hidden.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    running_max, running_sum, target_logit = jax.lax.fori_loop(0, n_chunks, body, init)
    lse = running_max + jnp.log(running_sum)
    return lse - target_logit, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce(vocab_major: bool, chunk_size: int, hidden: jax.Array, weight: jax.Array,
                targets: jax.Array) -> jax.Array:
    return _forward(vocab_major, chunk_size, hidden, weight, targets)[0]


def _fwd(vocab_major, chunk_size, hidden, weight, targets):
    ce, lse = _forward(vocab_major, chunk_size, hidden, weight, targets)
    return ce, (hidden, weight, targets, lse)


def _bwd(vocab_major, chunk_size, residuals, g):
    hidden, weight, targets, lse = residuals
    _, _, n_chunks = _geometry(weight, vocab_major, chunk_size)
    precision = matmul_precision(hidden.dtype)
    axis = 0 if vocab_major else 1

    def body(i, carry):
        d_hidden, d_weight = carry
        start, rows, logits, ids = _chunk(hidden, weight, i, vocab_major, chunk_size)
        probs = jnp.exp(logits - lse[:, None])  # 0 on masked columns
        onehot = (ids[None, :] == targets[:, None]) & (logits > -jnp.inf)
        d_logits = (g[:, None] * (probs - onehot)).astype(hidden.dtype)
        d_hidden = d_hidden + jnp.einsum("nc,ch->nh", d_logits, rows,
                                         preferred_element_type=jnp.float32, precision=precision)
        d_rows = jnp.einsum("nc,nh->ch", d_logits, hidden, preferred_element_type=jnp.float32,
                            precision=precision)
        d_rows = d_rows if vocab_major else d_rows.T
        size = d_rows.shape[axis]
        current = jax.lax.dynamic_slice_in_dim(d_weight, start, size, axis=axis)
        d_weight = jax.lax.dynamic_update_slice_in_dim(d_weight, current + d_rows, start, axis)
        return d_hidden, d_weight

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
    d_hidden, d_weight = jax.lax.fori_loop(0, n_chunks, body, init)
    return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), None


_chunked_ce.defvjp(_fwd, _bwd)
