"""The batched pipeline: shapes, seeded order, process sharding, epochs, and resumable state."""

import json

import numpy as np
import pytest

from flare_jax.data.pipeline import DataConfig, build_dataset
from flare_jax.data.records import Record, parse_record
from flare_jax.data.tokenize import DocumentTokenizer

NUM_DOCS, SEQ_LEN, BATCH = 30, 8, 2


def _doc_id_tokens(record: Record) -> dict[str, np.ndarray]:
    """A stand-in tokenizer: document ``i`` becomes ``(i % 4) + 2`` copies of the token ``i``."""
    doc = int(record.text)
    return {"tokens": np.full(doc % 4 + 2, doc, np.int32), "loss_mask": np.ones(doc % 4 + 2, bool)}


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(NUM_DOCS)))
    return str(path)


def _config(path: str, **overrides) -> DataConfig:
    return DataConfig(**{"paths": (path,), "seq_len": SEQ_LEN, "batch_size": BATCH, **overrides})


def _doc_ids(batches) -> list[int]:
    """Documents in stream order (a split document would count twice; none is split here)."""
    ids = []
    for batch in batches:
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"], strict=True):
            ids += [int(tokens[segments == s][0]) for s in np.unique(segments[segments > 0])]
    return ids


def test_batches_shape_dtype_and_padding(corpus_path):
    batch = next(iter(build_dataset(_config(corpus_path, pad_id=7), _doc_id_tokens, 0, 1)))
    assert set(batch) == {"tokens", "segment_ids", "loss_mask"}
    assert batch["tokens"].shape == batch["segment_ids"].shape == (BATCH, SEQ_LEN)
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool
    padding = batch["segment_ids"] == 0
    assert np.all(batch["tokens"][padding] == 7) and not np.any(batch["loss_mask"][padding])


def test_seeded_order_is_deterministic_and_epochs_differ(corpus_path):
    cfg = _config(corpus_path, seed=3, num_epochs=2, drop_remainder=False)
    first = _doc_ids(build_dataset(cfg, _doc_id_tokens, 0, 1))
    assert first == _doc_ids(build_dataset(cfg, _doc_id_tokens, 0, 1))
    assert sorted(first) == sorted(list(range(NUM_DOCS)) * 2)
    epoch0, epoch1 = first[:NUM_DOCS], first[NUM_DOCS:]
    assert sorted(epoch0) == list(range(NUM_DOCS)) and epoch0 != epoch1
    other = _config(corpus_path, seed=4, num_epochs=1, drop_remainder=False)
    other_seed = _doc_ids(build_dataset(other, _doc_id_tokens, 0, 1))
    assert other_seed[:NUM_DOCS] != epoch0
    unshuffled = _config(corpus_path, shuffle=False, num_epochs=1, drop_remainder=False)
    assert _doc_ids(build_dataset(unshuffled, _doc_id_tokens, 0, 1)) == list(range(NUM_DOCS))


def test_processes_read_disjoint_shards(corpus_path):
    cfg = _config(corpus_path, num_epochs=1, drop_remainder=False)
    shards = [set(_doc_ids(build_dataset(cfg, _doc_id_tokens, p, 3))) for p in range(3)]
    assert set.union(*shards) == set(range(NUM_DOCS))
    assert sum(len(s) for s in shards) == NUM_DOCS
    with pytest.raises(ValueError, match="process_index 3"):
        build_dataset(cfg, _doc_id_tokens, 3, 3)


@pytest.mark.parametrize("threads", [0, 2])
def test_restored_state_continues_the_same_batches(corpus_path, threads):
    cfg = _config(corpus_path, seed=11, read_threads=threads, prefetch=threads)
    it = iter(build_dataset(cfg, _doc_id_tokens, 0, 1))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]  # runs into the second epoch
    restored = iter(build_dataset(cfg, _doc_id_tokens, 0, 1))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_end_to_end_with_tokenizer_and_chat(tmp_path, tokenizer_dir):
    path = tmp_path / "mixed.jsonl"
    records = [{"text": "the quick brown fox"}, {"prompt": "hello world", "response": "the dog"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = DocumentTokenizer.from_dir(tokenizer_dir)
    cfg = DataConfig(paths=(str(path),), seq_len=64, batch_size=1, shuffle=False, num_epochs=1)
    (batch,) = list(build_dataset(cfg, tok, 0, 1))
    docs = [tok(r) for r in map(_as_record, records)]
    n0, n1 = (len(d["tokens"]) for d in docs)
    np.testing.assert_array_equal(batch["segment_ids"][0, : n0 + n1], [1] * n0 + [2] * n1)
    np.testing.assert_array_equal(
        batch["tokens"][0, : n0 + n1], np.concatenate([d["tokens"] for d in docs])
    )
    np.testing.assert_array_equal(batch["loss_mask"][0, n0 : n0 + n1], docs[1]["loss_mask"])
    assert 0 < docs[1]["loss_mask"].sum() < n1


def _as_record(raw: dict) -> Record:
    return parse_record(raw, "test")


@pytest.mark.parametrize(
    "overrides,field",
    [({"seq_len": 0}, "seq_len"), ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"),
     ({"num_epochs": 0}, "num_epochs"), ({"prefetch": -1}, "prefetch")],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config("x.jsonl", **overrides)
    with pytest.raises(ValueError, match="paths"):
        DataConfig(paths="x.jsonl", seq_len=8, batch_size=1)
