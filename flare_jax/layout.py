"""The FLARE sequence layout: per-token metadata of packed ``[clean ; noisy]`` training rows.

A packed row of ``L`` tokens holds contiguous documents marked by ``segment_ids`` (int32
``[B, L]``; tail padding, conventionally segment 0, is one more segment of its own and carries no
loss). Positions restart at 0 at every document start. Blocks of ``block_size`` tokens lie on the
absolute grid of the row (``block_id = index_in_row // block_size``), so a document may start
mid-block and the last block may be partial. The model input is the clean row followed by its
noised copy, which reuses the clean segments, positions and blocks;
:mod:`pallas_kernels.block_attention.mask` states who sees whom.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.mask import TokenLayout


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Index of each token inside its document: 0 wherever the segment id changes. ``[B, L]``."""
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {segment_ids.shape}")
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    document_start = jax.lax.cummax(jnp.where(changed, index, 0), axis=1)
    return index - document_start


def grid_block_ids(segment_ids: jax.Array, block_size: int) -> jax.Array:
    """Block of each token on the absolute grid of its row: ``index_in_row // block_size``."""
    _check_block_size(block_size)
    segment_ids = jnp.asarray(segment_ids)
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return jnp.broadcast_to(index // block_size, segment_ids.shape)


def causal_layout(segment_ids: jax.Array) -> TokenLayout:
    """Layout of a plain causal (clean only) packed row."""
    segment_ids = jnp.asarray(segment_ids, dtype=jnp.int32)
    return TokenLayout.causal(segment_ids, document_positions(segment_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlareLayout:
    """Clean and noisy streams of a packed row; both share segments, positions and blocks."""

    clean: TokenLayout
    noisy: TokenLayout
    block_size: int = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_segments(cls, segment_ids: jax.Array, block_size: int) -> FlareLayout:
        """Build the layout of a packed row from its ``segment_ids [B, L]``."""
        segment_ids = jnp.asarray(segment_ids, dtype=jnp.int32)
        positions = document_positions(segment_ids)
        block_ids = grid_block_ids(segment_ids, block_size)
        zeros = jnp.zeros_like(segment_ids)
        clean = TokenLayout(segment_ids, positions, block_ids, zeros)
        noisy = TokenLayout(segment_ids, positions, block_ids, jnp.ones_like(segment_ids))
        return cls(clean=clean, noisy=noisy, block_size=block_size)

    def packed(self) -> TokenLayout:
        """Layout of the ``2L``-token model input ``[clean ; noisy]``."""
        return self.clean.concat(self.noisy)

    @property
    def num_blocks(self) -> int:
        """Blocks per row, counting a partial last block."""
        return -(-self.clean.shape[1] // self.block_size)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
