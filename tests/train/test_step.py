"""The train step's pieces: the sharding rules cover every parameter of the real shapes;
schedule and FLOP counting (AR-only training as causal LM training: test_multidevice.py)."""

import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from workers import TINY_CONFIG

from flare_jax.checkpoint import flatten
from flare_jax.layout import FlareLayout
from flare_jax.train import config as train_config
from flare_jax.train import load_config_file
from flare_jax.train.mesh import mesh_shape
from flare_jax.train.metrics import train_flops_per_row, visible_pairs
from flare_jax.train.optimizer import learning_rate_schedule
from flare_jax.train.sharding import logical_spec, param_logical_axes, process_batch_slice
from flare_jax.train.step import (
    abstract_params,
)
from pallas_kernels.block_attention.mask import dense_mask


@pytest.mark.parametrize("name", ["qwen3_5_0p8b", "qwen3_5_9b"])
def test_sharding_rules_cover_every_parameter(name):
    cfg = load_config_file(TINY_CONFIG.with_name(f"{name}.py"))
    cfg.model.mask_token_id = 0
    config = train_config.model_config_from(cfg, None)
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 8, "tensor": 4})
    specs = {}
    for path, leaf in flatten(abstract_params(config)).items():
        key = "/".join(path)
        specs[key] = logical_spec(param_logical_axes(key, leaf.ndim), leaf.shape, mesh)
    assert specs["embed_tokens"] == PartitionSpec("tensor", "fsdp")
    assert specs["layers/3/self_attn/q_proj/kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs["layers/0/linear_attn/out_proj/kernel"] == PartitionSpec("tensor", "fsdp")
    assert specs["layers/0/mlp/down_proj/kernel"] == PartitionSpec("tensor", "fsdp")
    assert specs["layers/0/input_layernorm/weight"] == PartitionSpec(None)
    # 16 or 32 value heads shard over 4; an undivisible dimension is replicated instead.
    assert specs["layers/0/linear_attn/in_proj_a/kernel"] == PartitionSpec("fsdp", "tensor")
    odd = logical_spec(("embed", "heads"), (1024, 6), mesh)
    assert odd == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule for parameter layers/0/new/kernel"):
        param_logical_axes("layers/0/new/kernel", 2)


def test_mesh_shape():
    assert mesh_shape(2, -1, 2, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices, 8 are available"):
        mesh_shape(2, 3, 1, 8)


def test_learning_rate_schedule():
    schedule = learning_rate_schedule(1.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-6, atol=1e-7)


def test_visible_pairs_match_the_mask():
    length, block = 10, 4
    layout = FlareLayout.from_segments(jnp.ones((1, length), jnp.int32), block)
    packed = layout.packed()
    mask = np.asarray(dense_mask(packed, packed))
    assert visible_pairs(length, block, flare=True) == mask.sum()
    assert visible_pairs(length, block, flare=False) == mask[..., :length, :length].sum()


def test_flare_flops_cover_both_streams():
    cfg = load_config_file(TINY_CONFIG.with_name("qwen3_5_0p8b.py"))
    cfg.model.mask_token_id = 0
    config = train_config.model_config_from(cfg, None)
    flare = train_flops_per_row(config, 4096, 32, flare=True)
    causal = train_flops_per_row(config, 4096, 32, flare=False)
    assert 2.0 <= flare / causal < 2.1


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    process_index: int


def _fake_mesh(shape: tuple[int, int, int], devices_per_process: int) -> Mesh:
    devices = np.empty(int(np.prod(shape)), dtype=object)
    for i in range(devices.size):
        devices[i] = _FakeDevice(i, i // devices_per_process)
    return Mesh(devices.reshape(shape), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("shape, per_process, slices", [
    ((2, 4, 1), 2, [(0, 4), (1, 4), (2, 4), (3, 4)]),  # batch axes span the processes
    ((1, 2, 4), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),  # tensor pairs of processes share rows
    ((1, 1, 8), 2, [(0, 1)] * 4),  # pure tensor parallelism: every process holds every row
    ((1, 8, 1), 8, [(0, 1)]),  # one process
])
def test_process_batch_slice(shape, per_process, slices):
    mesh = _fake_mesh(shape, per_process)
    assert [process_batch_slice(mesh, p) for p in range(len(slices))] == slices


def test_process_batch_slice_rejects_interleaved_processes():
    # devices of process 0 and 1 alternate along fsdp: process 0 holds batch shards 0 and 2
    mesh = _fake_mesh((1, 4, 1), 1)
    devices = mesh.devices.copy()
    devices[0, :, 0] = [_FakeDevice(i, i % 2) for i in range(4)]
    with pytest.raises(ValueError, match=r"holds batch shards \[0, 2\] of 4"):
        process_batch_slice(Mesh(devices, mesh.axis_names), 0)
