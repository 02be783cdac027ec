"""Tile sizes shared by the Triton-lowered GPU kernels."""

from __future__ import annotations

MIN_TILE = 16  # Triton tiles are powers of two; dots need at least 16


def dividing_tile(dim: int, want: int, *, interpret: bool, what: str) -> int:
    """The largest power-of-two tile ``<= want`` (and ``>= MIN_TILE``) that divides ``dim``.

    Interpret mode also takes the whole ``dim`` when none divides it; on the GPU that is an error
    naming ``what`` (e.g. ``"the GPU conv kernel's channel count"``).
    """
    block = want
    while block > MIN_TILE and dim % block:
        block //= 2
    if dim % block:
        if interpret:
            return dim
        raise ValueError(f"{what} must be a multiple of {MIN_TILE}, got {dim}")
    return block
