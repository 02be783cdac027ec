"""flare-jax: convert hybrid-attention AR LLMs into block-diffusion LLMs and serve them."""

from flare_jax.convert.hf_to_jax import convert_hf
from flare_jax.convert.jax_to_hf import export_hf
from flare_jax.pretrained import Model, load
from flare_jax.sampling import Engine, GenerationResult, Sampler

__all__ = ["Engine", "GenerationResult", "Model", "Sampler", "convert_hf", "export_hf", "load"]
