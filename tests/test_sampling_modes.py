"""Verified and diffusion decoding on tiny random models (fp32): verified greedy equals AR greedy
token for token; fused diffusion equals denoising then appending each block, one pass cheaper per
block; diffusion step counts follow the schedule; cache rollback is exact."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flare_jax
from flare_jax.model.cache import init_cache
from flare_jax.sampling.batch import PromptBatch
from flare_jax.sampling.denoising import DenoiseSchedule, denoise_block
from flare_jax.sampling.prefill import prefill
from flare_jax.sampling.token_selection import SamplingParams
from pallas_kernels.block_attention.mask import EMPTY_SEGMENT

MASK_ID = 2


@pytest.fixture(scope="module")
def samplers(hf_checkpoint, tmp_path_factory):
    out = []
    for seed, overrides in enumerate([{}, dict(layer_types=[
            "full_attention", "linear_attention", "linear_attention", "full_attention"])]):
        directory, _ = hf_checkpoint(f"modes{seed}", seed=30 + seed, **overrides)
        ckpt = flare_jax.convert_hf(directory, tmp_path_factory.mktemp(f"modes{seed}") / "ckpt")
        model = flare_jax.load(ckpt)
        model = flare_jax.Model(dataclasses.replace(model.config, mask_token_id=MASK_ID),
                                model.module)
        out.append(flare_jax.Sampler(model))
    return out


def prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, size=n).tolist() for n in (5, 19, 11)]


@pytest.mark.parametrize("which, block_size, steps", [(0, 4, 0), (1, 8, 2)])
def test_verified_greedy_equals_ar(samplers, which, block_size, steps):
    sampler = samplers[which]
    batch = prompts(which)
    ar = sampler.generate(batch, mode="ar", max_new_tokens=23)
    verified = sampler.generate(batch, mode="verified", max_new_tokens=23, block_size=block_size,
                                steps_per_block=steps, threshold=0.5)
    for a, v in zip(ar, verified, strict=True):
        assert v.tokens == a.tokens
        assert v.finish_reason == a.finish_reason


def test_verified_counts_forward_passes(samplers):
    """With one denoising step per draft (threshold 0) each round costs two passes and keeps at
    least one token, so passes <= 1 + 2 * tokens; an exact count comes from the round loop."""
    sampler = samplers[0]
    result = sampler.generate([[5, 6, 7]], mode="verified", max_new_tokens=16, block_size=4,
                              threshold=0.0, stop_token_ids=[])[0]
    assert len(result.tokens) == 16
    assert 1 + 2 * 4 <= result.forward_passes <= 1 + 2 * 16


@pytest.mark.parametrize("kwargs, steps", [
    (dict(steps_per_block=2), 2),      # fixed steps
    (dict(threshold=0.0), 1),          # everything passes the threshold at once
    (dict(threshold=0.0, sub_blocks=2), 2),  # but two sub-blocks take two steps
    (dict(threshold=1.0), 8),          # nothing passes: one token per step
])
def test_diffusion_schedule_sets_passes(samplers, kwargs, steps):
    """The prefill makes the first block's first step and each commit pass the next block's:
    1 + blocks * steps passes."""
    sampler = samplers[0]
    results = sampler.generate(prompts(2), mode="diffusion", max_new_tokens=16, block_size=8,
                               stop_token_ids=[], **kwargs)
    for result in results:
        assert len(result.tokens) == 16
        assert MASK_ID not in result.tokens
        assert result.forward_passes == 1 + 2 * steps


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "blocks", "cache_length"))
def denoise_then_append(graphdef, state, batch_arrays, threshold, *, schedule, blocks,
                        cache_length):
    """Unfused reference: each block is denoised against the committed cache, then appended by a
    causal pass. Returns the new tokens ``[B, blocks * bs]`` and the forward passes per row."""
    model = nnx.merge(graphdef, state)
    tokens, segment_ids, positions, lengths = batch_arrays
    last_logits, cache = prefill(model, tokens, segment_ids, positions, cache_length)
    size = schedule.block_size

    def block(carry, _):
        cache, last_logits, start = carry
        where = start[:, None] + jnp.arange(size)[None, :]
        masks = jnp.full((len(start), size), MASK_ID, jnp.int32)
        filled, steps = denoise_block(model, cache, masks, masks == MASK_ID, where, last_logits,
                                      threshold, schedule, SamplingParams(), jax.random.key(0))
        logits, cache = model(filled, jnp.ones_like(filled), where, cache)
        return (cache, logits[:, -1], start + size), (filled, steps + 1)

    _, (out, passes) = jax.lax.scan(block, (cache, last_logits, lengths), None, length=blocks)
    return jnp.concatenate(list(out), axis=1), 1 + passes.sum(0)


@pytest.mark.parametrize("which, schedule, threshold", [
    (0, DenoiseSchedule(4, steps_per_block=2), 0.0),
    (1, DenoiseSchedule(4, logit_shift=True), 0.04),
])
def test_fused_diffusion_equals_denoise_then_append(samplers, which, schedule, threshold):
    """Greedy, batched prompts of different lengths: the same tokens as the unfused reference, and
    one forward pass fewer for every block."""
    sampler, blocks = samplers[which], 3
    batch = prompts(10 + which)
    fused = sampler.generate(batch, mode="diffusion", max_new_tokens=blocks * 4,
                             block_size=4, steps_per_block=schedule.steps_per_block,
                             logit_shift=schedule.logit_shift, threshold=threshold,
                             stop_token_ids=[])
    padded = PromptBatch.left_padded(batch, pad_id=0, multiple=16)
    arrays = tuple(jnp.asarray(x) for x in (padded.tokens, padded.segment_ids, padded.positions,
                                            padded.lengths))
    tokens, passes = denoise_then_append(sampler.graphdef, sampler.state, arrays,
                                         jnp.float32(threshold), schedule=schedule,
                                         blocks=blocks, cache_length=64)
    for row, result in enumerate(fused):
        assert result.tokens == np.asarray(tokens[row]).tolist()
        assert result.forward_passes == int(passes[row]) - blocks
    if not schedule.steps_per_block:  # between 1 and 4 steps a block: the threshold decided
        assert all(1 + 2 * blocks < int(p) < 1 + 5 * blocks for p in passes)


def test_diffusion_stops_at_eos_and_max_tokens(samplers):
    sampler = samplers[0]
    free = sampler.generate([[9, 8, 7]], mode="diffusion", max_new_tokens=13, block_size=4,
                            threshold=0.0, stop_token_ids=[])[0]
    assert len(free.tokens) == 13
    stop = free.tokens[6]
    cut = sampler.generate([[9, 8, 7]], mode="diffusion", max_new_tokens=13, block_size=4,
                           threshold=0.0, stop_token_ids=[stop])[0]
    assert cut.tokens == free.tokens[:free.tokens.index(stop) + 1]
    assert cut.finish_reason == "eos"


def test_keep_prefix_equals_appending_only_the_prefix(samplers):
    module = samplers[0].model.module
    tokens = jnp.asarray([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]])
    seg = jnp.ones_like(tokens)

    @nnx.jit
    def run(module, keep):
        cache = init_cache(module.config, 2, 32, jnp.float32)
        _, cache = module(tokens[:, :2], seg[:, :2], jnp.arange(2)[None].repeat(2, 0), cache)
        positions = 2 + jnp.arange(4)[None].repeat(2, 0)
        _, full, pending = module.append(tokens[:, 2:], seg[:, 2:], positions, cache)
        cut = module.keep_prefix(full, pending, keep)
        # reference: append only the kept tokens (row 0 keeps 1, row 1 keeps 3)
        _, ref0 = module(tokens[:1, 2:3], seg[:1, 2:3], positions[:1, :1],
                         jax_tree_row(cache, 0))
        _, ref1 = module(tokens[1:, 2:5], seg[1:, 2:5], positions[1:, :3],
                         jax_tree_row(cache, 1))
        return cut, ref0, ref1

    cut, ref0, ref1 = run(module, jnp.asarray([1, 3]))
    assert cut.length.tolist() == [3, 5]
    assert int((cut.segment_ids[0] != EMPTY_SEGMENT).sum()) == 3
    for row, ref in ((0, ref0), (1, ref1)):
        for mine, theirs in zip(cut.layers, ref.layers, strict=True):
            for a, b in zip(dataclasses.astuple(mine), dataclasses.astuple(theirs), strict=True):
                n = int(ref.length[0])
                a_row = np.asarray(a[row])
                b_row = np.asarray(b[0])
                if a_row.ndim == 3 and a_row.shape[0] == 32:  # K/V: compare the kept slots
                    a_row, b_row = a_row[:n], b_row[:n]
                # 1e-5: the reference appends 1 token (recurrent step) or 3 (chunked form); the
                # two forms order fp32 sums differently.
                np.testing.assert_allclose(a_row, b_row, atol=1e-5, rtol=0)


def jax_tree_row(cache, row):
    import jax

    return jax.tree.map(lambda x: x[row:row + 1], cache)


def test_bad_arguments(samplers):
    sampler = samplers[0]
    with pytest.raises(ValueError, match="sub_blocks"):
        sampler.generate([[3]], mode="diffusion", block_size=8, sub_blocks=3)
    with pytest.raises(ValueError, match="steps_per_block"):
        sampler.generate([[3]], mode="diffusion", block_size=4, steps_per_block=5)
    with pytest.raises(ValueError, match="threshold"):
        sampler.generate([[3]], mode="verified", threshold=1.5)
    with pytest.raises(ValueError, match="block_size"):
        sampler.generate([[3]], mode="diffusion", block_size=0)
    plain = flare_jax.Sampler(dataclasses.replace(sampler.model, config=dataclasses.replace(
        sampler.model.config, mask_token_id=None)))
    with pytest.raises(ValueError, match="mask_token_id"):
        plain.generate([[3]], mode="diffusion")
