"""Corpus sources: the three file formats, record shapes, and errors that say where and what."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from flare_jax.data.records import Message, Record, RecordError
from flare_jax.data.sources import corpus, open_source

RAW = [
    {"text": "hello world"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"prompt": "2+2?", "response": "4", "id": 7},
]
EXPECTED = [
    Record(text="hello world"),
    Record(messages=(Message("system", "be brief"), Message("user", "hi"),
                     Message("assistant", "hello"))),
    Record(messages=(Message("user", "2+2?"), Message("assistant", "4"))),
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _write_array_record(path, payloads):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    return str(path)


def test_three_formats_read_the_same_records(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", RAW)
    parquet = str(tmp_path / "a.parquet")
    columns = {key: [r.get(key) for r in RAW] for key in ("text", "messages", "prompt", "response")}
    pq.write_table(pa.Table.from_pydict(columns), parquet, row_group_size=2)
    arec = _write_array_record(tmp_path / "a.array_record", [json.dumps(r).encode() for r in RAW])
    for path in (jsonl, parquet, arec):
        source = open_source(path)
        assert len(source) == 3
        assert [source[i] for i in (2, 0, 1)] == [EXPECTED[2], EXPECTED[0], EXPECTED[1]], path


def test_jsonl_skips_blank_lines_and_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": "b"}\n{"text": 3}\nnot json\n')
    source = open_source(str(path))
    assert len(source) == 4 and source[0] == Record(text="a")
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: expected a 'text' field.*\['txt'\]"):
        source[1]
    with pytest.raises(RecordError, match=r"bad\.jsonl:4: field 'text' must be a string, got int"):
        source[2]
    with pytest.raises(RecordError, match=r"bad\.jsonl:5: not a UTF-8 JSON object"):
        source[3]


@pytest.mark.parametrize(
    "raw,message",
    [
        ([1, 2], "expected an object, got list"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"prompt": "x", "response": None}, "'response' must be a string"),
    ],
)
def test_malformed_chat_records(tmp_path, raw, message):
    source = open_source(_write_jsonl(tmp_path / "c.jsonl", [raw]))
    with pytest.raises(RecordError, match=r"c\.jsonl:1: .*" + message):
        source[0]


def test_parquet_and_array_record_errors_name_row_and_record(tmp_path):
    parquet = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), parquet)
    with pytest.raises(RecordError, match=r"p\.parquet row 1: expected a 'text' field"):
        open_source(parquet)[1]
    no_columns = str(tmp_path / "q.parquet")
    pq.write_table(pa.Table.from_pylist([{"body": "a"}]), no_columns)
    with pytest.raises(RecordError, match=r"q\.parquet: no column among"):
        open_source(no_columns)
    arec = _write_array_record(tmp_path / "r.array_record", [b'{"text": "a"}', b"\xff\xfe"])
    with pytest.raises(RecordError, match=r"r\.array_record record 1: not a UTF-8 JSON object"):
        open_source(arec)[1]


def test_corpus_concatenates_globs_in_sorted_order(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "b0"}])
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "a0"}, {"text": "a1"}])
    docs = corpus([str(tmp_path / "*.jsonl")])
    assert [r.text for r in docs] == ["a0", "a1", "b0"]
    with pytest.raises(ValueError, match="unknown corpus format"):
        corpus([str(tmp_path / "x.csv")])
    with pytest.raises(TypeError, match="not one string"):
        corpus(str(tmp_path / "a.jsonl"))
