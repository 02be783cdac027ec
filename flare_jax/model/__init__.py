"""Flax NNX modules of the hybrid backbone."""

from flare_jax.model.cache import DecodeCache, init_cache
from flare_jax.model.hybrid import HybridLM

__all__ = ["DecodeCache", "HybridLM", "init_cache"]
