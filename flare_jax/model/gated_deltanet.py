"""Gated DeltaNet token mixer (the linear-attention layer of Qwen3.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax import ops
from flare_jax.config import ModelConfig
from flare_jax.model.cache import LinearCache, LinearPending
from flare_jax.model.conv import conv_window
from flare_jax.model.layers import Dense, Dtype, GatedRMSNorm
from pallas_kernels.gated_delta.api import GatedDeltaInputs


class GatedDeltaNet(nnx.Module):
    """in_proj_qkv -> causal conv + SiLU -> (q, k l2-normalised, v) -> gated delta rule with
    ``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)`` -> gated RMSNorm(z) -> out_proj."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 backend: str = "auto"):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = c
        self.dtype = dtype
        self.backend = backend
        self.in_proj_qkv = Dense(c.hidden_size, c.linear_conv_dim, **kw)
        self.in_proj_z = Dense(c.hidden_size, c.linear_value_dim, **kw)
        self.in_proj_b = Dense(c.hidden_size, c.linear_num_value_heads, **kw)
        self.in_proj_a = Dense(c.hidden_size, c.linear_num_value_heads, **kw)
        bound = 1.0 / np.sqrt(c.linear_conv_kernel_dim)
        self.conv_weight = nnx.Param(jax.random.uniform(
            rngs.params(), (c.linear_conv_kernel_dim, c.linear_conv_dim), param_dtype, -bound, bound))
        self.dt_bias = nnx.Param(jnp.ones((c.linear_num_value_heads,), param_dtype))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(
            rngs.params(), (c.linear_num_value_heads,), jnp.float32, 0.01, 16.0)).astype(param_dtype))
        self.norm = GatedRMSNorm(c.linear_value_head_dim, eps=c.rms_norm_eps, param_dtype=param_dtype)
        self.out_proj = Dense(c.linear_value_dim, c.hidden_size, **kw)

    def _conv_layout(self) -> dict:
        """How the conv treats the q, k, v channels: q and k l2-normalised per head (fp32), the
        output as the three parts."""
        c = self.config
        return dict(l2_heads=(c.linear_key_head_dim, 2 * c.linear_key_dim),
                    split_at=(c.linear_key_dim, 2 * c.linear_key_dim), backend=self.backend)

    def _conv(self, mixed: jax.Array, segment_ids: jax.Array,
              context: jax.Array | None) -> tuple[jax.Array, ...]:
        """``(q, k, v)``: conv + SiLU of the q, k, v channels (:meth:`_conv_layout`)."""
        return ops.causal_conv_silu(mixed, self.conv_weight[...], segment_ids, context=context,
                                    **self._conv_layout())

    def _gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The decay ``g`` and the write strength ``beta`` of every token of ``x``, ``[B, T, Hv]``
        fp32."""
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias[...].astype(jnp.float32))
        return g, beta

    def _inputs(self, qkv: tuple[jax.Array, ...], g: jax.Array, beta: jax.Array
                ) -> GatedDeltaInputs:
        c = self.config
        q, k, v = qkv
        batch, length, _ = q.shape
        q = q.reshape(batch, length, c.linear_num_key_heads, c.linear_key_head_dim)
        k = k.reshape(batch, length, c.linear_num_key_heads, c.linear_key_head_dim)
        v = v.reshape(batch, length, c.linear_num_value_heads, c.linear_value_head_dim)
        return GatedDeltaInputs(q, k, v, g, beta)

    def _gate_inputs(self, x: jax.Array) -> jax.Array:
        """The output norm's gate ``z``, ``[B, T, Hv, Dv]``."""
        c = self.config
        batch, length, _ = x.shape
        return self.in_proj_z(x).reshape(batch, length, c.linear_num_value_heads,
                                         c.linear_value_head_dim)

    def _project_out(self, normed: jax.Array) -> jax.Array:
        batch, length = normed.shape[:2]
        return self.out_proj(normed.reshape(batch, length, self.config.linear_value_dim))

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        return self._project_out(self.norm(o.astype(self.dtype), self._gate_inputs(x)))

    def __call__(self, x: jax.Array, segment_ids: jax.Array, cache: LinearCache | None = None,
                 continues: jax.Array | None = None
                 ) -> tuple[jax.Array, LinearCache, LinearPending | None]:
        """Causal pass over ``x [B, T, hidden]``, continuing from ``cache`` in the rows where
        ``continues [B]`` is True (other rows start a new document from zero state).

        Returns the output, the cache after the last token (conv window and recurrent state) and,
        with a cache, what :meth:`cache_after_prefix` needs to end it after fewer tokens.
        """
        mixed = self.in_proj_qkv(x)
        context = initial_state = None
        if cache is not None:
            keep = continues[:, None, None]
            context = jnp.where(keep, cache.conv, jnp.zeros_like(cache.conv))
            initial_state = jnp.where(keep[..., None], cache.state, jnp.zeros_like(cache.state))
        inputs = self._inputs(self._conv(mixed, segment_ids, context), *self._gates(x))
        o, state = ops.gated_delta(inputs, segment_ids=segment_ids, initial_state=initial_state,
                                   backend=self.backend)
        window = conv_window(mixed, segment_ids, context, self.config.linear_conv_kernel_dim)
        pending = None if cache is None else LinearPending(context, initial_state, mixed, inputs)
        return self._output(x, o), LinearCache(window, state), pending

    def cache_after_prefix(self, pending: LinearPending, segment_ids: jax.Array,
                           keep: jax.Array) -> LinearCache:
        """The cache after only the first ``keep [B]`` of the appended tokens.

        Tokens past the prefix get decay 0 and write strength 0, so they leave the state as it is;
        only the gated delta recurrence is rerun (no projections).
        """
        valid = jnp.arange(segment_ids.shape[1])[None, :] < keep[:, None]
        inputs = pending.inputs._replace(g=jnp.where(valid[..., None], pending.inputs.g, 0.0),
                                         beta=jnp.where(valid[..., None], pending.inputs.beta, 0.0))
        _, state = ops.gated_delta(inputs, segment_ids=segment_ids,
                                   initial_state=pending.state, backend=self.backend)
        pad = self.config.linear_conv_kernel_dim - 1
        inputs_so_far = jnp.concatenate([pending.context.astype(pending.mixed.dtype),
                                         pending.mixed], axis=1)
        window = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, pad))(
            inputs_so_far, keep)
        return LinearCache(window.astype(pending.context.dtype), state)

    def flare(self, x: jax.Array, segment_ids: jax.Array, block_size: int) -> jax.Array:
        """Both FLARE streams of the packed row ``x [B, 2T, hidden]`` (the clean stream, then
        the noisy one; ``segment_ids [B, T]`` of each) in one pass: the noisy copy of each block
        starts from the clean stream's conv window and recurrent state at that block's boundary.

        The projections and the output norm run once over the whole row and the conv reads its
        two halves in place, so only the recurrence sees the streams apart (its outputs are
        joined inside the norm's fusion). On an H100 this took the 0.8B FLARE step from 469.3 to
        462.5-464.5 ms (docs/performance.md, "The Gated DeltaNet layers on the packed row")."""
        def halves(a: jax.Array) -> list[jax.Array]:
            return jnp.split(a, 2, axis=1)

        conv_clean, conv_noisy = ops.causal_conv_silu_pair(
            self.in_proj_qkv(x), self.conv_weight[...], segment_ids, block_size=block_size,
            **self._conv_layout())
        (g_clean, g_noisy), (beta_clean, beta_noisy) = map(halves, self._gates(x))
        o_clean, o_noisy = ops.gated_delta_handoff(
            self._inputs(conv_clean, g_clean, beta_clean),
            self._inputs(conv_noisy, g_noisy, beta_noisy),
            segment_ids=segment_ids, block_size=block_size, backend=self.backend)
        o = jnp.concatenate([o_clean, o_noisy], axis=1).astype(self.dtype)
        return self._project_out(self.norm(o, self._gate_inputs(x)))
