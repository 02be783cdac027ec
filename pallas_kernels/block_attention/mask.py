"""Visibility rule of FLARE block-diffusion attention, as a function of per-token metadata.

Every attention form (plain causal, packed ``[clean ; noisy]`` training rows, decode against a KV
cache, block denoising) is described by one :class:`TokenLayout` for the queries and one for the keys.
The mask is never an ``L x L`` argument: kernels evaluate :func:`visible` on tiles of metadata.

Rules, for a query ``q`` and key ``k`` of the same segment (``segment_id`` equal):
  - clean ``q`` sees clean ``k`` with ``position_k <= position_q`` (causal);
  - noisy ``q`` sees clean ``k`` with ``block_k < block_q`` (earlier blocks only);
  - noisy ``q`` sees noisy ``k`` with ``block_k == block_q`` (bidirectional inside its block);
  - clean ``q`` never sees noisy ``k``.
Keys of another segment are never visible. A key slot that holds nothing (an unfilled cache slot) uses
segment id ``EMPTY_SEGMENT``, which no query carries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

EMPTY_SEGMENT = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Per-token metadata of one side of an attention call; every field is ``int32 [B, T]``.

    ``noisy`` is 0 for clean-stream tokens and 1 for noisy-stream tokens.
    """

    segment_ids: jax.Array
    positions: jax.Array
    block_ids: jax.Array
    noisy: jax.Array

    @classmethod
    def causal(cls, segment_ids: jax.Array, positions: jax.Array) -> TokenLayout:
        """Layout of a plain causal (all clean) sequence; block ids are unused and set to 0."""
        zeros = jnp.zeros_like(segment_ids, dtype=jnp.int32)
        return cls(segment_ids.astype(jnp.int32), positions.astype(jnp.int32), zeros, zeros)

    def concat(self, other: TokenLayout) -> TokenLayout:
        """Concatenate two layouts along the token axis (e.g. ``[clean ; noisy]``)."""
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), self, other)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.segment_ids.shape


def visible(
    q_segment: jax.Array,
    q_position: jax.Array,
    q_block: jax.Array,
    q_noisy: jax.Array,
    k_segment: jax.Array,
    k_position: jax.Array,
    k_block: jax.Array,
    k_noisy: jax.Array,
) -> jax.Array:
    """Boolean visibility of key ``k`` from query ``q``; inputs broadcast against each other."""
    same_segment = q_segment == k_segment
    q_is_noisy = q_noisy != 0
    k_is_noisy = k_noisy != 0
    clean_clean = ~q_is_noisy & ~k_is_noisy & (k_position <= q_position)
    noisy_clean = q_is_noisy & ~k_is_noisy & (k_block < q_block)
    noisy_noisy = q_is_noisy & k_is_noisy & (k_block == q_block)
    return same_segment & (clean_clean | noisy_clean | noisy_noisy)


def dense_mask(q_layout: TokenLayout, kv_layout: TokenLayout) -> jax.Array:
    """Materialised ``[B, Tq, Tk]`` boolean mask; for references, tests and baselines only."""

    def col(x: jax.Array) -> jax.Array:
        return x[:, :, None]

    def row(x: jax.Array) -> jax.Array:
        return x[:, None, :]

    return visible(
        col(q_layout.segment_ids), col(q_layout.positions), col(q_layout.block_ids),
        col(q_layout.noisy),
        row(kv_layout.segment_ids), row(kv_layout.positions), row(kv_layout.block_ids),
        row(kv_layout.noisy),
    )
