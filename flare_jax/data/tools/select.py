"""Select transfer data: keep records by thresholds or quantiles of their scores, drop exact and
near duplicates, and mix several sources by weight.

Order of operations: score conditions (per source; a quantile threshold is resolved over that
source's records), then dedup across all sources in order (the first occurrence is kept), then the
mixture: with weights ``w_i`` normalised to fractions ``f_i``, ``total`` records (default: the
largest total no source has to repeat records for) are split by largest-remainder rounding and each
source's share is drawn without replacement, seeded by ``(seed, source number)``; a share larger
than the source repeats whole copies first. The output directory holds ``data.jsonl`` (records in
source then index order, with ``source`` and ``index`` fields), ``report.json`` and
``dropped.jsonl`` (one row per dropped record: source, index, reason, detail).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flare_jax.checkpoint import atomic_directory
from flare_jax.data.records import Record
from flare_jax.data.sources import open_source
from flare_jax.data.tools.dedup import NearDuplicateIndex, document_text, exact_key
from flare_jax.data.tools.io import read_rows, record_to_dict, write_rows
from flare_jax.data.tools.report import SelectionReport, SourceReport
from flare_jax.data.tools.score import default_scores_path

DEDUP_MODES = ("none", "exact", "near")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"^\s*(\w+)\s*(>=|<=|>|<)\s*(q?)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")


@dataclasses.dataclass(frozen=True)
class Condition:
    """Keep records whose score ``field`` satisfies ``op value``; with ``quantile`` the value is a
    quantile in [0, 1] of the field over the source. Written ``perplexity<=q0.9`` or
    ``mean_logprob>=-2.5``."""

    field: str
    op: str
    value: float
    quantile: bool = False

    @classmethod
    def parse(cls, spec: str) -> Condition:
        match = _CONDITION.match(spec)
        if match is None:
            raise ValueError(f"condition {spec!r}: expected FIELD OP [q]NUMBER with OP among "
                             f"{list(_OPS)}, e.g. 'perplexity<=q0.9' or 'mean_logprob>=-2.5'")
        field, op, quantile, value = match.groups()
        condition = cls(field, op, float(value), bool(quantile))
        if condition.quantile and not 0.0 <= condition.value <= 1.0:
            raise ValueError(f"condition {spec!r}: a quantile must be in [0, 1]")
        return condition

    def __str__(self) -> str:
        return f"{self.field}{self.op}{'q' if self.quantile else ''}{self.value:g}"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A data file, its mixture weight and its scores file (default: next to it, jsonl then
    parquet, see :func:`~flare_jax.data.tools.score.default_scores_path`)."""

    path: str
    weight: float = 1.0
    scores: str | None = None

    def scores_path(self) -> Path:
        if self.scores is not None:
            return Path(self.scores)
        candidates = [default_scores_path(self.path, fmt) for fmt in ("jsonl", "parquet")]
        return next((p for p in candidates if p.is_file()), candidates[0])


def select(sources: Sequence[SourceSpec | str | Path], output_dir: str | Path, *,
           keep: Sequence[Condition | str] = (), dedup: str = "near",
           near_threshold: float = 0.8, total: int | None = None, seed: int = 0,
           overwrite: bool = False) -> SelectionReport:
    """Select records from ``sources`` into ``output_dir`` (see the module doc); every record and
    scores file is validated before anything is written. Returns the report."""
    specs = [SourceSpec(str(s)) if isinstance(s, str | Path) else s for s in sources]
    conditions = [Condition.parse(c) if isinstance(c, str) else c for c in keep]
    if not specs:
        raise ValueError("select needs at least one source")
    if dedup not in DEDUP_MODES:
        raise ValueError(f"dedup must be one of {DEDUP_MODES}, got {dedup!r}")
    if any(s.weight < 0 for s in specs) or not any(s.weight > 0 for s in specs):
        raise ValueError("source weights must be >= 0 with at least one > 0")
    if total is not None and total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"{output_dir}: already exists (pass overwrite to replace it)")
    loaded = [_load(spec, conditions) for spec in specs]
    reports = [SourceReport(s.path, s.weight, len(records))
               for s, (records, _) in zip(specs, loaded, strict=True)]
    dropped: list[dict[str, Any]] = []

    def drop(source: int, index: int, reason: str, detail: Any = None) -> None:
        reports[source].dropped[reason] += 1
        dropped.append({"source": specs[source].path, "index": index, "reason": reason,
                        "detail": detail})

    survivors = [_filter(records, scores, conditions, reports[i], lambda *a, i=i: drop(i, *a))
                 for i, (records, scores) in enumerate(loaded)]
    if dedup != "none":
        survivors = _dedup(specs, [records for records, _ in loaded], survivors, dedup,
                           near_threshold, drop)
    chosen = _mix(specs, survivors, total, seed, reports, drop)
    rows = [{**record_to_dict(loaded[i][0][index]), "source": specs[i].path, "index": index}
            for i, indices in enumerate(chosen) for index in indices]
    report = SelectionReport(str(Path(output_dir) / "data.jsonl"), {
        "keep": [str(c) for c in conditions], "dedup": dedup, "near_threshold": near_threshold,
        "total": total, "seed": seed}, reports)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        write_rows(tmp / "data.jsonl", rows)
        write_rows(tmp / "dropped.jsonl", dropped)
        (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _load(spec: SourceSpec, conditions: Sequence[Condition]
          ) -> tuple[list[Record], list[dict[str, Any]] | None]:
    source = open_source(spec.path)
    records = [source[i] for i in range(len(source))]
    if not conditions:
        return records, None
    path = spec.scores_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scores for {spec.path}; run `flare data score` first")
    scores = sorted(read_rows(path), key=lambda row: row.get("index", -1))
    if [row.get("index") for row in scores] != list(range(len(records))):
        raise ValueError(f"{path}: rows do not cover the {len(records)} records of {spec.path} "
                         "one to one (by 'index'); rescore it")
    missing = sorted({c.field for c in conditions} - set(scores[0])) if scores else []
    if missing:
        raise ValueError(f"{path}: no score fields {missing}; fields are {sorted(scores[0])}")
    return records, scores


def _filter(records: list[Record], scores: list[dict[str, Any]] | None,
            conditions: Sequence[Condition], report: SourceReport,
            drop: Callable[..., None]) -> list[int]:
    keep = list(range(len(records)))
    if scores is None:
        return keep
    for condition in conditions:
        values = [scores[i].get(condition.field) for i in range(len(records))]
        present = np.asarray([v for v in values if v is not None], np.float64)
        threshold: float | None = condition.value
        if condition.quantile:
            threshold = float(np.quantile(present, condition.value)) if present.size else None
        report.thresholds[str(condition)] = threshold
        passed = []
        for index in keep:
            value = values[index]
            if value is None or threshold is None:
                drop(index, f"missing {condition.field}")
            elif not _OPS[condition.op](value, threshold):
                drop(index, f"filter {condition}", value)
            else:
                passed.append(index)
        keep = passed
    return keep


def _dedup(specs: Sequence[SourceSpec], records: list[list[Record]], survivors: list[list[int]],
           mode: str, near_threshold: float, drop: Callable[..., None]) -> list[list[int]]:
    exact: dict[str, tuple[int, int]] = {}
    near = NearDuplicateIndex(near_threshold) if mode == "near" else None
    kept: list[list[int]] = []

    def name(key: tuple[int, int]) -> str:
        return f"{specs[key[0]].path}:{key[1]}"

    for i, indices in enumerate(survivors):
        kept.append([])
        for index in indices:
            record, key = records[i][index], (i, index)
            first = exact.setdefault(exact_key(record), key)
            if first != key:
                drop(i, index, "exact duplicate", name(first))
                continue
            similar = near.find_or_add(key, document_text(record)) if near else None
            if similar is not None:
                drop(i, index, "near duplicate", {"of": name(similar[0]), "jaccard": similar[1]})
                continue
            kept[-1].append(index)
    return kept


def _mix(specs: Sequence[SourceSpec], survivors: list[list[int]], total: int | None, seed: int,
         reports: list[SourceReport], drop: Callable[..., None]) -> list[list[int]]:
    weights = np.asarray([s.weight for s in specs], np.float64)
    fractions = weights / weights.sum()
    available = np.asarray([len(s) for s in survivors])
    empty = [specs[i].path for i in np.flatnonzero((fractions > 0) & (available == 0))]
    if empty:
        raise ValueError(f"no records left after filtering and dedup in {empty}, whose weights "
                         "ask for some; lower their weight to 0 or relax the conditions")
    if total is None:  # the largest total that needs no source to repeat records
        used = fractions > 0
        total = int(np.floor(np.min(available[used] / fractions[used]) + 1e-9))
    share = fractions * total
    counts = np.floor(share).astype(int)
    by_remainder = np.argsort(-(share - counts), kind="stable")
    counts[by_remainder[:total - counts.sum()]] += 1
    chosen = []
    for i, (indices, count) in enumerate(zip(survivors, counts, strict=True)):
        rng = np.random.default_rng([seed, i])
        copies, rest = divmod(int(count), max(len(indices), 1))
        picked = set(rng.choice(len(indices), rest, replace=False).tolist())
        for position, index in enumerate(indices):
            if copies == 0 and position not in picked:
                drop(i, index, "mixture share")
        order = [*range(len(indices))] * copies + sorted(picked)
        chosen.append(sorted(indices[p] for p in order))
        reports[i].kept = len(chosen[-1])
        reports[i].repeated = len(chosen[-1]) - len(set(chosen[-1]))
    return chosen
