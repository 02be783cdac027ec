"""Tile schedule of block-diffusion attention: which (query tile, key tile) pairs can see anything.

Kernels never see a dense mask. Outside the kernel, each tile of ``block`` tokens is summarised by
ranges of its metadata; a tile pair is kept when the summaries allow a visible pair (so it is
skipped only when provably invisible) and each tile gets the ascending list of its partner tiles,
flagged where every pair is visible (no mask needed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout

# Segment id of padded query rows: no key carries it (padded keys use EMPTY_SEGMENT).
PAD_QUERY_SEGMENT = EMPTY_SEGMENT - 1


def pad_layout(layout: TokenLayout, length: int, segment: int) -> TokenLayout:
    """Pad every field along tokens to ``length``; padded tokens get segment id ``segment``.

    The other fields repeat the last real token, so padding does not widen tile summaries.
    """
    extra = length - layout.shape[1]
    if extra == 0:
        return layout
    widths = ((0, 0), (0, extra))
    edge = lambda x: jnp.pad(x, widths, mode="edge")
    return TokenLayout(jnp.pad(layout.segment_ids, widths, constant_values=segment),
                       edge(layout.positions), edge(layout.block_ids), edge(layout.noisy))


_HIGH = jnp.iinfo(jnp.int32).max
_LOW = jnp.iinfo(jnp.int32).min


@dataclasses.dataclass(frozen=True)
class _LexRange:
    """Per-tile lexicographic min and max of ``(segment, value)`` over a subset of its tokens.

    An empty subset gives min = (HIGH, HIGH) > max = (LOW, LOW), so every test below fails.
    """

    seg_min: jax.Array
    val_min: jax.Array
    seg_max: jax.Array
    val_max: jax.Array

    @classmethod
    def of(cls, segment: jax.Array, value: jax.Array, keep: jax.Array, block: int) -> _LexRange:
        segment, value, keep = (x.reshape(x.shape[0], -1, block) for x in (segment, value, keep))
        seg_min = jnp.where(keep, segment, _HIGH).min(-1)
        seg_max = jnp.where(keep, segment, _LOW).max(-1)
        val_min = jnp.where(keep & (segment == seg_min[..., None]), value, _HIGH).min(-1)
        val_max = jnp.where(keep & (segment == seg_max[..., None]), value, _LOW).max(-1)
        return cls(seg_min, val_min, seg_max, val_max)

    def expand(self, axis: int) -> _LexRange:
        return _LexRange(*(jnp.expand_dims(x, axis) for x in dataclasses.astuple(self)))


def _lex_le(seg_a, val_a, seg_b, val_b, strict: bool = False) -> jax.Array:
    """``(seg_a, val_a) <= (seg_b, val_b)`` lexicographically (``<`` when ``strict``)."""
    tie = val_a < val_b if strict else val_a <= val_b
    return (seg_a < seg_b) | ((seg_a == seg_b) & tie)


def _maybe_visible(q_layout: TokenLayout, kv_layout: TokenLayout, block_q: int,
                   block_k: int) -> jax.Array:
    """False only if no (query, key) pair of the tiles is visible.

    Each rule needs a same-segment pair ordered by position or block id, so it is tested on the
    lexicographic ranges of ``(segment, position)`` / ``(segment, block)`` of the tiles' clean and
    noisy tokens: a tile straddling two documents is not taken as visible from early queries of
    the first one.
    """

    def ranges(layout, block, field, noisy, axis):
        keep = (layout.noisy != 0) if noisy else (layout.noisy == 0)
        return _LexRange.of(layout.segment_ids, getattr(layout, field), keep, block).expand(axis)

    q_pos, k_pos = ranges(q_layout, block_q, "positions", False, 2), ranges(
        kv_layout, block_k, "positions", False, 1)
    q_blk, k_clean_blk = ranges(q_layout, block_q, "block_ids", True, 2), ranges(
        kv_layout, block_k, "block_ids", False, 1)
    k_noisy_blk = ranges(kv_layout, block_k, "block_ids", True, 1)
    clean_clean = _lex_le(k_pos.seg_min, k_pos.val_min, q_pos.seg_max, q_pos.val_max) & (
        q_pos.seg_min <= k_pos.seg_max)
    noisy_clean = _lex_le(k_clean_blk.seg_min, k_clean_blk.val_min, q_blk.seg_max,
                          q_blk.val_max, strict=True) & (q_blk.seg_min <= k_clean_blk.seg_max)
    noisy_noisy = _lex_le(k_noisy_blk.seg_min, k_noisy_blk.val_min, q_blk.seg_max,
                          q_blk.val_max) & _lex_le(q_blk.seg_min, q_blk.val_min,
                                                   k_noisy_blk.seg_max, k_noisy_blk.val_max)
    return clean_clean | noisy_clean | noisy_noisy


def _all_visible(q_layout: TokenLayout, kv_layout: TokenLayout, block_q: int,
                 block_k: int) -> jax.Array:
    """True only if every (query, key) pair of the tiles is visible."""

    def summary(layout, block, axis):
        out = {}
        for name in ("segment_ids", "positions", "block_ids", "noisy"):
            x = getattr(layout, name).reshape(layout.shape[0], -1, block)
            out[name + "_min"] = jnp.expand_dims(x.min(-1), axis)
            out[name + "_max"] = jnp.expand_dims(x.max(-1), axis)
        return out

    q, k = summary(q_layout, block_q, 2), summary(kv_layout, block_k, 1)
    one_segment = ((q["segment_ids_min"] == q["segment_ids_max"])
                   & (k["segment_ids_min"] == k["segment_ids_max"])
                   & (q["segment_ids_min"] == k["segment_ids_min"]))
    all_q_clean, all_q_noisy = q["noisy_max"] == 0, q["noisy_min"] != 0
    all_k_clean, all_k_noisy = k["noisy_max"] == 0, k["noisy_min"] != 0
    one_block = ((q["block_ids_min"] == q["block_ids_max"])
                 & (k["block_ids_min"] == k["block_ids_max"])
                 & (q["block_ids_min"] == k["block_ids_min"]))
    return one_segment & (
        (all_q_clean & all_k_clean & (k["positions_max"] <= q["positions_min"]))
        | (all_q_noisy & all_k_clean & (k["block_ids_max"] < q["block_ids_min"]))
        | (all_q_noisy & all_k_noisy & one_block))


def tile_visibility(q_layout: TokenLayout, kv_layout: TokenLayout, block_q: int,
                    block_k: int) -> tuple[jax.Array, jax.Array]:
    """Bools ``(maybe, full)``, each ``[B, Tq // block_q, Tk // block_k]``.

    ``maybe`` is False only if no pair of the two tiles is visible; ``full`` is True only if every
    pair is visible (the kernel may then skip evaluating the mask).
    """
    return (_maybe_visible(q_layout, kv_layout, block_q, block_k),
            _all_visible(q_layout, kv_layout, block_q, block_k))


def tile_lists(maybe: jax.Array, full: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of ``maybe [B, N, M]``: ascending indices of its True columns (padded) and count.

    Returns ``indices int32 [B, N, M]`` (entries past the count repeat the last valid index, or 0),
    ``partial int32 [B, N, M]`` (1 where the listed tile needs the mask, i.e. is not ``full``) and
    ``counts int32 [B, N]``.
    """
    m = maybe.shape[-1]
    counts = maybe.sum(-1, dtype=jnp.int32)
    cols = jnp.arange(m, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(maybe, cols, m + cols), axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(cols < counts[..., None], order, last)
    partial = jnp.take_along_axis(maybe & ~full, indices, axis=-1).astype(jnp.int32)
    return indices, partial, counts
