"""FLARE layout: positions, grid blocks and the visibility they produce through ``dense_mask``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.layout import FlareLayout, causal_layout, document_positions
from pallas_kernels.block_attention.mask import dense_mask


def _matrix(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)


# Row 0: document 1 = tokens 0..2, document 2 = tokens 3..4 (starts mid-block 0, runs into block 1),
# token 5 is tail padding (segment 0). Row 1: one document over the whole row. block_size = 4, so
# block 1 (tokens 4..5) is partial. Columns/rows 0..5 are the clean stream, 6..11 the noisy one.
SEGMENTS = [[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3]]
EXPECTED_ROW0 = _matrix(
    """
    100000000000
    110000000000
    111000000000
    000100000000
    000110000000
    000001000000
    000000111000
    000000111000
    000000111000
    000000000100
    000100000010
    000000000001
    """
)
EXPECTED_ROW1 = _matrix(
    """
    100000000000
    110000000000
    111000000000
    111100000000
    111110000000
    111111000000
    000000111100
    000000111100
    000000111100
    000000111100
    111100000011
    111100000011
    """
)


def test_positions_and_blocks():
    layout = FlareLayout.from_segments(jnp.array(SEGMENTS), block_size=4)
    np.testing.assert_array_equal(layout.clean.positions, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(layout.noisy.positions, layout.clean.positions)
    np.testing.assert_array_equal(layout.clean.block_ids, [[0, 0, 0, 0, 1, 1]] * 2)
    np.testing.assert_array_equal(layout.clean.noisy, np.zeros((2, 6)))
    np.testing.assert_array_equal(layout.noisy.noisy, np.ones((2, 6)))
    assert layout.num_blocks == 2
    packed = layout.packed()
    assert packed.shape == (2, 12)
    assert all(x.dtype == jnp.int32 for x in jax.tree.leaves(packed))


def test_packed_visibility_exact():
    packed = FlareLayout.from_segments(jnp.array(SEGMENTS), block_size=4).packed()
    mask = np.asarray(dense_mask(packed, packed))
    np.testing.assert_array_equal(mask[0], EXPECTED_ROW0)
    np.testing.assert_array_equal(mask[1], EXPECTED_ROW1)


def test_block_size_one_noisy_sees_all_earlier_clean():
    # With one-token blocks, noisy i sees clean j < i of its document and only itself among noisy.
    packed = FlareLayout.from_segments(jnp.array([[1, 1, 1]]), block_size=1).packed()
    mask = np.asarray(dense_mask(packed, packed))[0]
    np.testing.assert_array_equal(mask[3:, :3], np.tril(np.ones((3, 3), bool), k=-1))
    np.testing.assert_array_equal(mask[3:, 3:], np.eye(3, dtype=bool))


def test_layout_is_a_pytree_with_static_block_size():
    layout = FlareLayout.from_segments(jnp.array(SEGMENTS), block_size=4)
    leaves, treedef = jax.tree.flatten(layout)
    assert len(leaves) == 8
    out = jax.jit(lambda lay: lay.clean.block_ids * lay.block_size)(layout)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 4, 4]] * 2)
    assert jax.tree.unflatten(treedef, leaves).block_size == 4


def test_causal_layout_restarts_positions():
    layout = causal_layout(jnp.array([[5, 5, 7, 7, 7, 0]]))
    np.testing.assert_array_equal(layout.positions, [[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(layout.noisy, np.zeros((1, 6)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="block_size"):
        FlareLayout.from_segments(jnp.array(SEGMENTS), block_size=0)
    with pytest.raises(ValueError, match="segment_ids"):
        document_positions(jnp.array([1, 1, 2]))
