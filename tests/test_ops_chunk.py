"""The chunk of the model's gated delta calls follows their length (short decoding passes do not
pad to the full chunk), and the result does not depend on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax import ops
from pallas_kernels.gated_delta.api import GatedDeltaInputs, gated_delta_rule


@pytest.mark.parametrize("length, chunk", [(1, 16), (8, 16), (16, 16), (17, 32), (32, 32),
                                           (40, 32), (300, 32)])
def test_chunk_follows_length(length, chunk):
    assert ops.chunk_for_length(length) == chunk


def test_short_call_equals_chunk_64():
    """fp32 on the CPU: chunk 16 and chunk 64 differ only in summation order (1e-5)."""
    keys = iter(jax.random.split(jax.random.key(3), 8))
    batch, length, heads, dim = 2, 12, 2, 8

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    inputs = GatedDeltaInputs(unit(jax.random.normal(next(keys), (batch, length, heads, dim))),
                              unit(jax.random.normal(next(keys), (batch, length, heads, dim))),
                              jax.random.normal(next(keys), (batch, length, heads, dim)),
                              -jax.nn.softplus(jax.random.normal(next(keys), (batch, length, heads))),
                              jax.nn.sigmoid(jax.random.normal(next(keys), (batch, length, heads))))
    segments = jnp.asarray([[1] * 12, [1] * 5 + [2] * 7], jnp.int32)
    state = jax.random.normal(next(keys), (batch, heads, dim, dim))
    o, s = ops.gated_delta(inputs, segment_ids=segments, initial_state=state)
    o64, s64 = gated_delta_rule(*inputs, segment_ids=segments, initial_state=state, chunk_size=64)
    np.testing.assert_allclose(o, o64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s64, rtol=1e-5, atol=1e-5)
