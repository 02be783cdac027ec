"""`flare data select`: score conditions, exact / near dedup, weighted mixtures, the report, and
malformed input (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flare_jax.cli import main
from flare_jax.data import Record, RecordError, open_source
from flare_jax.data.tools import Condition, NearDuplicateIndex, SourceSpec, exact_key, select

LONG = ("the quick brown fox jumps over the lazy dog while the farmer watches from the porch "
        "and the cows graze quietly in the green field beyond the old wooden fence")


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_condition_parse():
    assert Condition.parse("perplexity <= q0.9") == Condition("perplexity", "<=", 0.9, True)
    assert Condition.parse("mean_logprob>-2.5e0") == Condition("mean_logprob", ">", -2.5)
    assert str(Condition.parse("length>=10")) == "length>=10"
    for bad in ("perplexity=3", "ppl<=q1.5", "<=3"):
        with pytest.raises(ValueError, match="condition"):
            Condition.parse(bad)


def test_filters_by_threshold_and_quantile(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(10)])
    scores = [{"index": i, "perplexity": float(i + 1), "length": 10 * i} for i in range(10)]
    scores[3]["perplexity"] = None  # e.g. a one-token document: nothing was predicted
    write_jsonl(tmp_path / "d.scores.jsonl", scores[::-1])  # order does not matter, index does
    report = select([data], tmp_path / "out", keep=["perplexity<=q0.5", "length>=20"],
                    dedup="none")
    kept = read_jsonl(tmp_path / "out" / "data.jsonl")
    # quantile 0.5 of perplexities {1,2,3,5,...,10} (9 values) is 6 -> indices 0,1,2,4,5 pass;
    # then length >= 20 drops 0 and 1.
    assert [r["index"] for r in kept] == [2, 4, 5]
    assert kept[0] == {"text": "document number 2", "source": data, "index": 2}
    assert open_source(str(tmp_path / "out" / "data.jsonl"))[1].text == "document number 4"
    (source,) = report.sources
    assert source.thresholds == {"perplexity<=q0.5": 6.0, "length>=20": 20.0}
    assert dict(source.dropped) == {"missing perplexity": 1, "filter perplexity<=q0.5": 4,
                                    "filter length>=20": 2}
    dropped = read_jsonl(tmp_path / "out" / "dropped.jsonl")
    assert {(d["index"], d["reason"]) for d in dropped} >= {(3, "missing perplexity"),
                                                             (9, "filter perplexity<=q0.5")}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kept"] == 3 and saved["sources"][0]["dropped"]["filter length>=20"] == 2
    assert "3 kept" in report.summary()


def test_exact_and_near_dedup(tmp_path):
    near = LONG.replace("green", "grassy")
    rows = [{"text": LONG}, {"text": "  THE quick brown FOX jumps\tover the lazy dog while the "
                                     "farmer watches from the porch and the cows graze quietly "
                                     "in the green field beyond the old wooden fence"},
            {"text": near}, {"text": "an unrelated sentence about packing tokens"},
            {"prompt": "hello", "response": "world"}, {"messages": [
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert exact_key(Record(text=LONG)) != exact_key(Record(text=near))
    select([data], tmp_path / "exact", dedup="exact")
    assert [r["index"] for r in read_jsonl(tmp_path / "exact" / "data.jsonl")] == [0, 2, 3, 4]
    report = select([data], tmp_path / "near", dedup="near", near_threshold=0.7)
    assert [r["index"] for r in read_jsonl(tmp_path / "near" / "data.jsonl")] == [0, 3, 4]
    assert dict(report.sources[0].dropped) == {"exact duplicate": 2, "near duplicate": 1}
    near_row = next(d for d in read_jsonl(tmp_path / "near" / "dropped.jsonl") if d["index"] == 2)
    assert near_row["detail"]["of"] == f"{data}:0" and near_row["detail"]["jaccard"] >= 0.7


def test_near_duplicate_index_keeps_distinct_texts():
    index = NearDuplicateIndex(threshold=0.8)
    assert index.find_or_add("a", LONG) is None
    assert index.find_or_add("b", "a completely different text about something else") is None
    assert index.find_or_add("c", LONG + " today")[0] == "a"


def test_mixture_by_weight_is_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i} " + "x" * i} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i} " + "y" * i} for i in range(4)])
    sources = [SourceSpec(a, 3.0), SourceSpec(b, 1.0)]
    report = select(sources, tmp_path / "m1", dedup="none", seed=1)
    # The largest total with no repeats: b (4 records) is a quarter -> 16 would need 12 of a's 10,
    # so a binds: 10 / 0.75 = 13 -> shares 9.75 and 3.25 -> 10 and 3.
    assert [s.kept for s in report.sources] == [10, 3]
    first = read_jsonl(tmp_path / "m1" / "data.jsonl")
    select(sources, tmp_path / "m2", dedup="none", seed=1)
    assert read_jsonl(tmp_path / "m2" / "data.jsonl") == first
    report = select(sources, tmp_path / "m3", dedup="none", total=20, seed=1)
    assert [s.kept for s in report.sources] == [15, 5]
    assert [s.repeated for s in report.sources] == [5, 1]
    assert report.sources[0].dropped["mixture share"] == 0
    with pytest.raises(ValueError, match="no records left"):  # the copy of a is all duplicates
        select([SourceSpec(a), SourceSpec(a)], tmp_path / "m4", dedup="exact")
    assert not (tmp_path / "m4").exists()


def test_malformed_record_names_line_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"txt": "typo"}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:3"):
        select([str(path)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "good.scores.jsonl", [{"index": 0, "perplexity": 1.0}])
    with pytest.raises(ValueError, match="one to one"):
        select([good], tmp_path / "out", keep=["perplexity<=2"])
    unscored = write_jsonl(tmp_path / "unscored.jsonl", [{"text": "one"}])
    with pytest.raises(FileNotFoundError, match="flare data score"):
        select([unscored], tmp_path / "out", keep=["length>1"])
    assert not (tmp_path / "out").exists()


def test_cli_select(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "same"}, {"text": "same"}, {"text": "x"}])
    assert main(["data", "select", data, "--output", str(tmp_path / "out"), "--dedup",
                 "exact"]) == 0
    assert "2 kept" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 2
    assert main(["data", "select", data, "--output", str(tmp_path / "out")]) == 2  # exists
    assert main(["data", "select", data, "--output", str(tmp_path / "o2"), "--keep", "ppl=1"]) == 2
    assert "condition" in capsys.readouterr().err
