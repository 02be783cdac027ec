"""Decoding caches: K/V per position for attention layers, conv window + fp32 recurrent state for
linear-attention layers, and the per-slot token metadata shared by all attention layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flare_jax.config import FULL, ModelConfig
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout
from pallas_kernels.gated_delta.api import GatedDeltaInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionCache:
    """Keys and values of one attention layer, ``[B, S, Hkv, D]``."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearCache:
    """Last ``K - 1`` conv inputs ``[B, K-1, C]`` and the recurrent state ``[B, Hv, Dk, Dv]`` (fp32)."""

    conv: jax.Array
    state: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearPending:
    """What a linear layer needs to end its cache after any prefix of the tokens just appended:
    the conv context and recurrent state before them, their conv inputs ``mixed [B, T, C]`` and
    gated-delta inputs."""

    context: jax.Array
    state: jax.Array
    mixed: jax.Array
    inputs: GatedDeltaInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PendingAppend:
    """An append whose tokens may be cut back to a prefix (verified decoding): the row lengths
    before it, the appended tokens' segment ids, and each linear layer's pending inputs (None for
    attention layers, whose K/V beyond the kept prefix are hidden by emptying their slots)."""

    start: jax.Array
    segment_ids: jax.Array
    layers: tuple[LinearPending | None, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """All layers' caches plus slot metadata: ``segment_ids``/``positions [B, S]`` of each written
    slot (``EMPTY_SEGMENT`` where nothing is), and ``length [B]``, the number of slots written."""

    layers: tuple[AttentionCache | LinearCache, ...]
    segment_ids: jax.Array
    positions: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]

    def continues(self, segment_ids: jax.Array) -> jax.Array:
        """``[B]`` bool: whether new tokens ``segment_ids [B, T]`` continue the document of each
        row's last cached token (False for an empty row)."""
        last = jnp.take_along_axis(self.segment_ids, jnp.maximum(self.length - 1, 0)[:, None], 1)
        return (self.length > 0) & (last[:, 0] == segment_ids[:, 0])

    def keep_slots(self, new_length: jax.Array) -> DecodeCache:
        """Forget slots at or beyond ``new_length [B]`` (their metadata becomes empty)."""
        slot = jnp.arange(self.max_length)[None, :]
        segment_ids = jnp.where(slot < new_length[:, None], self.segment_ids, EMPTY_SEGMENT)
        return dataclasses.replace(self, segment_ids=segment_ids, length=new_length)

    def layout(self) -> TokenLayout:
        """Layout of the cache slots as clean keys of block 0."""
        return TokenLayout.causal(self.segment_ids, self.positions)


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype) -> DecodeCache:
    """An empty cache for ``batch`` rows of up to ``max_length`` tokens."""
    layers = []
    for layer_type in config.layer_types:
        if layer_type == FULL:
            shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
            layers.append(AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        else:
            conv = jnp.zeros((batch, config.linear_conv_kernel_dim - 1, config.linear_conv_dim), dtype)
            state = jnp.zeros((batch, config.linear_num_value_heads, config.linear_key_head_dim,
                               config.linear_value_head_dim), jnp.float32)
            layers.append(LinearCache(conv, state))
    empty = jnp.full((batch, max_length), EMPTY_SEGMENT, jnp.int32)
    return DecodeCache(tuple(layers), empty, jnp.zeros((batch, max_length), jnp.int32),
                       jnp.zeros((batch,), jnp.int32))


def write_rows(buffer: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``update [B, T, ...]`` into ``buffer [B, S, ...]`` at per-row offsets ``start [B]``."""

    def write_one(buf: jax.Array, upd: jax.Array, offset: jax.Array) -> jax.Array:
        index = (offset,) + (0,) * (buf.ndim - 1)
        return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), index)

    return jax.vmap(write_one)(buffer, update, start)


def cache_bytes_per_token(config: ModelConfig, dtype: jnp.dtype) -> int:
    """Bytes one more cached token costs (K and V of every attention layer, plus slot metadata)."""
    n_full = sum(t == FULL for t in config.layer_types)
    kv = 2 * config.num_key_value_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return n_full * kv + 2 * 4


def cache_bytes_per_request(config: ModelConfig, dtype: jnp.dtype) -> int:
    """Fixed bytes per request: conv windows and fp32 recurrent states of the linear layers."""
    n_linear = sum(t != FULL for t in config.layer_types)
    conv = (config.linear_conv_kernel_dim - 1) * config.linear_conv_dim * jnp.dtype(dtype).itemsize
    state = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return n_linear * (conv + state) + 4


def cache_memory_summary(config: ModelConfig, dtype: jnp.dtype, max_length: int,
                         batch: int = 1) -> str:
    """Human-readable cache sizes: per token, per request and for ``batch`` rows of
    ``max_length`` tokens."""
    per_token = cache_bytes_per_token(config, dtype)
    per_request = cache_bytes_per_request(config, dtype)
    total = batch * (per_request + max_length * per_token)
    mib = 1024**2
    return (f"cache ({jnp.dtype(dtype).name} K/V, fp32 recurrent states): "
            f"{per_token / 1024:.1f} KiB per token (attention layers), "
            f"{per_request / mib:.2f} MiB per request (conv windows + recurrent states); "
            f"{batch} x {max_length} tokens = {total / mib:.1f} MiB")
