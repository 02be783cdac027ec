"""Kernels under a mesh (flare_jax/ops.py): each op runs per shard through ``shard_map`` (rows over
the batch axes, heads over ``tensor`` where they divide) and gives the unsharded values and
gradients; the conv with l2-normalised q, k heads and q / k / v parts also where a tensor shard
holds parts of two of them; the head's softmax terms (logsumexp, target logit and
``softmax - onehot``) also with the vocabulary split over ``tensor`` (each shard's logsumexp
combined across shards, its exponentials scaled by its own factor). Run in a subprocess with 4 CPU devices."""

import json
import sys
from pathlib import Path

from host_devices import run_with_devices

# fp32 with 'highest' matmuls: per-shard runs differ from one device only in summation order.
RTOL = 1e-6
# The loss itself is a sum of products of either sign over every output (about 1.3e-6 off
# after partly cancelling, measured): its relative error is that of the summation order too,
# against a smaller total.
LOSS_RTOL = 5e-6
# The softmax terms are exp(x - offset) * exp(offset - lse) against exp(x - lse): an fp32
# logsumexp of |lse| ~ 10-15 is off by a few of its ulps (~1e-6), which exp turns into that
# relative error (seen: 1.4e-6); a shard's columns scaled by another shard's factor would be off
# by far more.
SOFTMAX_RTOL = 5e-6
MESHES = {"fsdp2_tensor2": (1, 2, 2), "data4": (4, 1, 1), "tensor4": (1, 1, 4)}


def worker(out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from flare_jax import ops
    from flare_jax.train.mesh import make_mesh
    from pallas_kernels.block_attention.mask import TokenLayout
    from pallas_kernels.gated_delta.api import GatedDeltaInputs

    jax.config.update("jax_default_matmul_precision", "highest")
    batch, length, heads, dim = 4, 16, 4, 8
    keys = iter(jax.random.split(jax.random.key(0), 17))

    def normal(shape):
        return jax.random.normal(next(keys), shape)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def stream():  # two key heads shared by four value heads
        return GatedDeltaInputs(unit(normal((batch, length, 2, dim))),
                                unit(normal((batch, length, 2, dim))),
                                normal((batch, length, heads, dim)),
                                -jax.nn.softplus(normal((batch, length, heads))),
                                jax.nn.sigmoid(normal((batch, length, heads))))

    segments = jnp.asarray([[1] * 16, [1] * 10 + [2] * 6, [3] * 16, [1] * 4 + [2] * 12], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), segments.shape)
    layout = TokenLayout.causal(segments, positions)
    args = (stream(), stream(), normal((batch, length, heads, dim)),
            normal((batch, length, 2, dim)), normal((batch, length, 2, dim)),
            normal((batch, length, 6 * dim)), normal((batch, length, 6 * dim)))
    conv_weight = normal((4, 6 * dim))
    logits = 5 * normal((batch, length, 24)).astype(jnp.bfloat16)  # 24 ids split 2 or 4 ways

    targets = jax.random.randint(jax.random.key(1), (batch, length), 0, logits.shape[2])

    def lse(logits):
        terms = ops.vocab_softmax(logits, targets, exp_dtype=jnp.float32, backend="gpu_interpret")
        shards = terms.norm.shape[2]
        grad = terms.norm[..., None] * terms.exp.reshape(batch, length, shards, -1)
        return terms.lse, terms.target_logit, grad.reshape(logits.shape)

    # 6 heads of q | k | v, 2 each; q and k normalised
    conv_layout = dict(l2_heads=(dim, 4 * dim), split_at=(2 * dim, 4 * dim), backend="gpu_interpret")

    def conv(x, clean=None):
        handoff = {} if clean is None else dict(clean=clean, block_size=4)
        return ops.causal_conv_silu(x, conv_weight, segments, **conv_layout, **handoff)

    def conv_pair(clean, noisy):
        outs = ops.causal_conv_silu_pair(jnp.concatenate([clean, noisy], axis=1), conv_weight,
                                         segments, block_size=4, **conv_layout)
        return outs[0] + outs[1]

    def loss(clean, noisy, q, k, v, mixed, mixed_noisy):
        o, state = ops.gated_delta(clean, segment_ids=segments)
        o_clean, o_noisy = ops.gated_delta_handoff(clean, noisy, segment_ids=segments,
                                                   block_size=4)
        attended = ops.attention(q, k, v, layout, layout)
        parts = conv(mixed) + conv(mixed_noisy, mixed) + conv_pair(mixed_noisy, mixed)
        return (jnp.sum(o * jnp.cos(o)) + jnp.sum(state ** 2) + jnp.sum(o_clean * o_noisy)
                + jnp.sum(attended * jnp.sin(attended))
                + sum(jnp.sum(p * jnp.sin(p + i)) for i, p in enumerate(parts)))

    grad = jax.value_and_grad(loss, argnums=range(7))
    reference = jax.tree.leaves(jax.jit(grad)(*args))
    logits32 = logits.astype(jnp.float32)
    lse_reference = (jax.nn.logsumexp(logits32, axis=-1),
                     jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0],
                     jax.nn.softmax(logits32) - jax.nn.one_hot(targets, logits.shape[2]))
    result = {"no_mesh_shard_maps": str(jax.make_jaxpr(loss)(*args)).count("shard_map")}
    for name, shape in MESHES.items():
        with jax.set_mesh(make_mesh(*shape)):
            shard_maps = str(jax.make_jaxpr(loss)(*args)).count("shard_map")
            got = jax.tree.leaves(jax.jit(grad)(*args))
            lse_shard_maps = str(jax.make_jaxpr(lse)(logits)).count("shard_map")
            lse_got = jax.jit(lse)(logits)
        (loss_got, *got), (loss_reference, *reference_grads) = got, reference
        errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                  for a, b in zip(got, reference_grads, strict=True)]
        softmax_errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                          for a, b in zip(lse_got, lse_reference, strict=True)]
        result[name] = {"shard_maps": shard_maps, "lse_shard_maps": lse_shard_maps,
                        "softmax_rel_error": max(softmax_errors),
                        "max_rel_error": max(errors),
                        "loss_rel_error": float(abs(loss_got - loss_reference) / abs(loss_reference))}
    out.write_text(json.dumps(result))


def test_ops_run_per_shard_and_match_one_device(tmp_path):
    result = run_with_devices(__file__, 4, tmp_path / "result.json")
    assert result["no_mesh_shard_maps"] == 0
    # batch split (and heads over tensor, the conv's channels too): one shard_map per op
    assert result["fsdp2_tensor2"]["shard_maps"] == 6 and result["data4"]["shard_maps"] == 6
    # two key / kv heads (six conv heads) do not split four ways and there is no batch axis:
    # ops run unsharded
    assert result["tensor4"]["shard_maps"] == 0
    # the softmax terms split their rows over the batch axes and their 24 ids over tensor (2 or 4
    # ways)
    assert all(result[name]["lse_shard_maps"] == 1 for name in MESHES)
    for name in MESHES:
        assert result[name]["max_rel_error"] <= RTOL, (name, result[name])
        assert result[name]["loss_rel_error"] <= LOSS_RTOL, (name, result[name])
        assert result[name]["softmax_rel_error"] <= SOFTMAX_RTOL, (name, result[name])


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
