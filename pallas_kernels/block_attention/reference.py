"""Pure-jnp oracle of block-diffusion attention (materialises the ``[B, Tq, Tk]`` mask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.mask import TokenLayout, dense_mask


def block_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_layout: TokenLayout,
    kv_layout: TokenLayout,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Masked GQA softmax attention in fp32; rows with no visible key output exactly 0.

    q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``; returns ``[B, Tq, Hq, D]`` in q's dtype.
    """
    batch, tq, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    scale = d**-0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(batch, tq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    mask = dense_mask(q_layout, kv_layout)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(s - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    return out.reshape(batch, tq, hq, d).astype(q.dtype)
