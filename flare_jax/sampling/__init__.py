"""Decoding: caches, AR / verified / diffusion modes and the public Sampler."""

from flare_jax.sampling.sampler import GenerationResult, Sampler

__all__ = ["GenerationResult", "Sampler"]
