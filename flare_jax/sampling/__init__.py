"""Decoding: caches, AR / verified / diffusion modes, the Sampler and the batched Engine."""

from flare_jax.sampling.engine import Engine
from flare_jax.sampling.sampler import GenerationResult, Sampler

__all__ = ["Engine", "GenerationResult", "Sampler"]
