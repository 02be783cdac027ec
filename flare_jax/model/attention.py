"""Gated full attention of Qwen3.5: q/k RMSNorm per head, partial RoPE, GQA, sigmoid output gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import ops
from flare_jax.config import ModelConfig
from flare_jax.model.cache import AttentionCache, write_rows
from flare_jax.model.layers import Dense, Dtype, RMSNorm
from flare_jax.model.rope import apply_rope, rope_angles
from pallas_kernels.block_attention.mask import TokenLayout


class GatedAttention(nnx.Module):
    """``q_proj`` yields query and gate per head; ``o = o_proj(attn(q, k, v) * sigmoid(gate))``."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 backend: str = "auto"):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = c
        self.backend = backend
        self.q_proj = Dense(c.hidden_size, 2 * c.num_attention_heads * c.head_dim, **kw)
        self.k_proj = Dense(c.hidden_size, c.num_key_value_heads * c.head_dim, **kw)
        self.v_proj = Dense(c.hidden_size, c.num_key_value_heads * c.head_dim, **kw)
        self.o_proj = Dense(c.num_attention_heads * c.head_dim, c.hidden_size, **kw)
        self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, q_layout: TokenLayout, kv_layout: TokenLayout,
                 cache: AttentionCache | None = None, write_start: jax.Array | None = None
                 ) -> tuple[jax.Array, AttentionCache | None]:
        """Attend from ``x``'s tokens (``q_layout``) to the keys described by ``kv_layout``.

        - no cache: the keys are ``x``'s own tokens (``kv_layout`` describes them);
        - cache and ``write_start [B]``: ``x``'s keys are written into the cache at those offsets and
          the whole cache is attended (``kv_layout`` describes the cache after the write);
        - cache without ``write_start`` (read-only, denoising): keys are the cache followed by
          ``x``'s own keys (``kv_layout`` describes that concatenation); the cache is unchanged.
        """
        c = self.config
        batch, length, _ = x.shape
        qg = self.q_proj(x).reshape(batch, length, c.num_attention_heads, 2 * c.head_dim)
        q, gate = qg[..., :c.head_dim], qg[..., c.head_dim:]
        k = self.k_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
        cos, sin = rope_angles(q_layout.positions, c.rotary_dim, c.rope_theta)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        new_cache = cache
        if cache is None:
            keys, values = k, v
        elif write_start is not None:
            new_cache = AttentionCache(write_rows(cache.k, k, write_start),
                                       write_rows(cache.v, v, write_start))
            keys, values = new_cache.k, new_cache.v
        else:
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        o = ops.attention(q, keys.astype(q.dtype), values.astype(q.dtype), q_layout, kv_layout,
                          backend=self.backend)
        o = o.reshape(batch, length, -1) * jax.nn.sigmoid(gate.reshape(batch, length, -1).astype(
            jnp.float32)).astype(o.dtype)
        return self.o_proj(o), new_cache
