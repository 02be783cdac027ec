"""Grouped (ragged) matmul of mixture-of-experts layers: rows sorted by group times per-group
weights, as ``jax.lax.ragged_dot``, with a Pallas GPU kernel."""

from pallas_kernels.grouped_matmul.api import grouped_matmul

__all__ = ["grouped_matmul"]
