"""Loading a flare-jax checkpoint into a ready-to-call model."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.checkpoint import PARAMS_DIR, Nested, flatten, load_params, read_model_config
from flare_jax.config import ModelConfig
from flare_jax.model.hybrid import HybridLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _abstract_module(config: ModelConfig, dtype: jnp.dtype, backend: str) -> HybridLM:
    return nnx.eval_shape(lambda: HybridLM(config, dtype=dtype, param_dtype=jnp.float32,
                                           rngs=nnx.Rngs(0), backend=backend))


def module_params(module: HybridLM) -> Nested:
    """The module's parameters as a nested dict with string keys (the checkpoint form)."""
    state = nnx.state(module, nnx.Param).to_pure_dict()

    def stringify(tree):
        return {str(k): stringify(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return stringify(state)


def module_from_params(config: ModelConfig, params: Nested, *, dtype: jnp.dtype = jnp.float32,
                       backend: str = "auto") -> HybridLM:
    """Build a :class:`HybridLM` computing in ``dtype`` around the given parameter arrays."""
    graphdef, state = nnx.split(_abstract_module(config, dtype, backend))
    flat_state = dict(nnx.to_flat_state(state))
    given = flatten(params)
    expected = {tuple(str(p) for p in path): path for path in flat_state}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameters do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, path in expected.items():
        want = flat_state[path].shape
        value = given[key]
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"parameter {'.'.join(key)} has shape {tuple(value.shape)}, "
                             f"config implies {tuple(want)}")
        flat_state[path].set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state))


@functools.partial(nnx.jit)
def _causal_logits(module: HybridLM, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return module(tokens, segment_ids)[0]


@dataclasses.dataclass
class Model:
    """A loaded model: its config, the NNX module and the directory it came from."""

    config: ModelConfig
    module: HybridLM
    directory: Path | None = None

    def logits(self, tokens, segment_ids=None) -> np.ndarray:
        """Causal logits ``[B, T, V]`` (fp32 numpy) of token ids ``[B, T]`` (or ``[T]``)."""
        tokens = np.asarray(tokens, np.int32)
        squeeze = tokens.ndim == 1
        tokens = tokens[None] if squeeze else tokens
        if segment_ids is None:
            segment_ids = np.ones_like(tokens)
        segment_ids = np.asarray(segment_ids, np.int32).reshape(tokens.shape)
        out = np.asarray(_causal_logits(self.module, jnp.asarray(tokens), jnp.asarray(segment_ids)))
        return out[0] if squeeze else out


def load(ckpt_dir: str | Path, dtype: str = "float32", backend: str = "auto") -> Model:
    """Load a flare-jax checkpoint directory; ``dtype`` is the compute dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    ckpt_dir = Path(ckpt_dir)
    config = read_model_config(ckpt_dir)
    params = load_params(ckpt_dir / PARAMS_DIR)
    module = module_from_params(config, params, dtype=DTYPES[dtype], backend=backend)
    return Model(config, module, ckpt_dir)
