"""Random initialisation per layer kind (flare_jax/train/init.py): the parameter tree of the whole
model, the module's own initial values where they are deterministic, fresh draws per layer and per
seed. That the values do not depend on the mesh is checked by the multi-device tests, which start
every mesh from ``init_params`` and compare the losses with one device."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from workers import TINY_CONFIG

from flare_jax.checkpoint import flatten
from flare_jax.model.hybrid import HybridLM
from flare_jax.pretrained import module_params
from flare_jax.train import config as train_config
from flare_jax.train import load_config_file
from flare_jax.train.init import init_params
from flare_jax.train.mesh import make_mesh


def test_per_layer_init_gives_the_module_tree_and_fresh_draws():
    cfg = load_config_file(TINY_CONFIG)
    cfg.model.hf_config.num_hidden_layers = 4  # two layers of each kind
    config = train_config.model_config_from(cfg, None)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = flatten(init_params(config, 0, mesh))
    module = flatten(module_params(HybridLM(config, param_dtype=jnp.float32, rngs=nnx.Rngs(0))))
    assert params.keys() == module.keys()
    for path, leaf in module.items():
        assert (params[path].shape, params[path].dtype) == (leaf.shape, leaf.dtype), path
        if float(jnp.std(leaf)) == 0:  # a constant initial value (norm weights): the same
            np.testing.assert_array_equal(params[path], leaf, err_msg=str(path))
    # random parameters: drawn afresh for every layer and every seed
    kernel = ("linear_attn", "in_proj_qkv", "kernel")
    first, second = (params[("layers", str(i), *kernel)] for i in (0, 2))
    assert not np.allclose(first, second)
    again = flatten(init_params(config, 0, mesh))
    other = flatten(init_params(config, 1, mesh))
    for path in params:
        np.testing.assert_array_equal(again[path], params[path])
    assert not np.allclose(other[("embed_tokens",)], params[("embed_tokens",)])
