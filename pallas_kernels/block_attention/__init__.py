"""Block-diffusion attention: one function over per-token layouts (see ``mask`` for the rule)."""

from pallas_kernels.block_attention.api import block_attention
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT, TokenLayout

__all__ = ["EMPTY_SEGMENT", "TokenLayout", "block_attention"]
