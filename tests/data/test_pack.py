"""Sequential packing: exact rows, long-document splitting, and resumable iterator state."""

import json

import grain
import numpy as np
import pytest

from flare_jax.data.pack import PackIterDataset


def _doc(tokens, loss=None):
    tokens = np.asarray(tokens, np.int32)
    loss = np.ones(len(tokens), bool) if loss is None else np.asarray(loss, bool)
    return {"tokens": tokens, "loss_mask": loss}


DOCS = [
    _doc([1, 2, 3], [0, 1, 1]),
    _doc([4, 5]),
    _doc(range(6, 13)),  # 7 tokens > seq_len 4: pieces of 4 and 3
    _doc([13]),
]
EXPECTED = [  # (tokens, segment_ids, loss_mask); pad id 99
    ([1, 2, 3, 99], [1, 1, 1, 0], [0, 1, 1, 0]),  # B does not fit in the 1 token left
    ([4, 5, 99, 99], [1, 1, 0, 0], [1, 1, 0, 0]),  # C's first piece (4) does not fit
    ([6, 7, 8, 9], [1, 1, 1, 1], [1, 1, 1, 1]),
    ([10, 11, 12, 13], [1, 1, 1, 2], [1, 1, 1, 1]),
]


def _packed() -> grain.IterDataset:
    return PackIterDataset(grain.MapDataset.source(DOCS).to_iter_dataset(), seq_len=4, pad_id=99)


def test_rows_exact():
    rows = list(_packed())
    assert len(rows) == len(EXPECTED)
    for row, (tokens, segments, loss) in zip(rows, EXPECTED, strict=True):
        np.testing.assert_array_equal(row["tokens"], tokens)
        np.testing.assert_array_equal(row["segment_ids"], segments)
        np.testing.assert_array_equal(row["loss_mask"], np.asarray(loss, bool))
        assert row["tokens"].dtype == np.int32 and row["segment_ids"].dtype == np.int32


@pytest.mark.parametrize("consumed", range(len(EXPECTED) + 1))
def test_state_restores_the_following_rows(consumed):
    it = iter(_packed())
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # states are plain JSON
    rest = list(it)
    restored = iter(_packed())
    restored.set_state(state)
    again = list(restored)
    assert len(again) == len(rest) == len(EXPECTED) - consumed
    for a, b in zip(again, rest, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        PackIterDataset(grain.MapDataset.source(DOCS).to_iter_dataset(), seq_len=0)
