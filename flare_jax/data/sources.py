"""Random-access corpus sources: JSON lines, Parquet and ArrayRecord files of records.

Every source has ``len`` and ``source[i] -> Record`` (see :mod:`flare_jax.data.records`), so grain
can shuffle and shard it by index. ArrayRecord records are UTF-8 JSON objects.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from flare_jax.data.records import Record, RecordError, parse_record

_RECORD_FIELDS = ("text", "messages", "prompt", "response")


class JsonlSource:
    """One JSON object per non-blank line; errors name the file and 1-based line."""

    def __init__(self, path: str):
        self.path = path
        offsets, lines = [], []
        with open(path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(offset)
                    lines.append(number)
                offset += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Record:
        where = f"{self.path}:{self._lines[index]}"
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.readline()
        return parse_record(_decode_json(line, where), where)


class ParquetSource:
    """Rows of a Parquet file with record columns; errors name the file and 0-based row.

    The record columns are decoded into memory when the file is opened: shuffled access into
    compressed row groups would decode a whole group per record. Corpora larger than memory
    belong in ArrayRecord files.
    """

    def __init__(self, path: str):
        pq = _import_parquet()
        self.path = path
        names = pq.ParquetFile(path).schema_arrow.names
        columns = [c for c in _RECORD_FIELDS if c in names]
        if not columns:
            raise RecordError(f"{path}: no column among {_RECORD_FIELDS}; got {names}")
        self._table = pq.read_table(path, columns=columns)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> Record:
        (row,) = self._table.slice(index, 1).to_pylist()
        raw = {k: v for k, v in row.items() if v is not None}
        return parse_record(raw, f"{self.path} row {index}")


class ArrayRecordSource:
    """ArrayRecord file whose records are UTF-8 JSON objects; errors name the file and record."""

    def __init__(self, path: str):
        try:
            import array_record.python.array_record_module  # noqa: F401
        except ImportError as e:  # pragma: no cover - grain depends on array_record on Linux
            raise ImportError(
                f"{path}: reading ArrayRecord corpora needs the array_record package, which has no "
                "wheel for this platform; convert the corpus to JSON lines or Parquet"
            ) from e
        self.path = path
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        where = f"{self.path} record {index}"
        return parse_record(_decode_json(self._source[index], where), where)


_SUFFIXES = {
    ".jsonl": JsonlSource,
    ".parquet": ParquetSource,
    ".array_record": ArrayRecordSource,
    ".arrayrecord": ArrayRecordSource,
}


def open_source(path: str) -> JsonlSource | ParquetSource | ArrayRecordSource:
    """Open one file, choosing the reader by its suffix (``.jsonl``, ``.parquet``,
    ``.array_record``)."""
    for suffix, reader in _SUFFIXES.items():
        if path.endswith(suffix):
            return reader(path)
    raise ValueError(f"{path}: unknown corpus format; expected a suffix among {sorted(_SUFFIXES)}")


def corpus(patterns: Sequence[str]) -> grain.MapDataset:
    """All records of the files matching ``patterns`` (globs, each expanded sorted), in order."""
    if isinstance(patterns, str):
        raise TypeError("patterns must be a sequence of paths or globs, not one string")
    paths = [p for pattern in patterns for p in sorted(glob.glob(pattern)) or [pattern]]
    return grain.MapDataset.concatenate([grain.MapDataset.source(open_source(p)) for p in paths])


def json_lines(path: str | Path, error: type[ValueError] = RecordError
               ) -> Iterator[tuple[str, Any]]:
    """``("file:line", value)`` for every non-blank line of a jsonl file, read in order; a line
    that is not JSON raises ``error`` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None
            yield where, value


def _decode_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{where}: not a UTF-8 JSON object ({e})") from None


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is installed in every supported env
        raise ImportError("reading Parquet corpora needs pyarrow (pip install pyarrow)") from e
    return pq
