"""Row files (JSON lines or Parquet, chosen by suffix) written atomically, and outputs assembled
from chunks so that an interrupted run resumes where it stopped.

A chunked output ``out.jsonl`` keeps its finished chunks under ``.out.jsonl.parts/`` (each chunk
file written to a temporary name and renamed, plus ``meta.json``: the settings the run started
with). A rerun skips finished chunks; the final file is assembled (atomically) when every chunk
is done and the parts directory is then removed. A rerun with other settings is refused rather than
mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flare_jax.data.records import Record

ROW_SUFFIXES = (".jsonl", ".parquet")
_META = "meta.json"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` atomically as JSON lines or Parquet, by the suffix of ``path``."""
    path = Path(path)
    _check_suffix(path)

    def write(tmp: Path) -> None:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = dict.fromkeys(key for row in rows for key in row)  # every row's keys
            pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in columns}), tmp)

    write_atomic(path, write)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a file written by :func:`write_rows`."""
    path = Path(path)
    _check_suffix(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def record_to_dict(record: Record) -> dict[str, Any]:
    """The canonical JSON form of a record (``text`` or ``messages``)."""
    if record.is_chat:
        return {"messages": [{"role": m.role, "content": m.content} for m in record.messages]}
    return {"text": record.text}


class ChunkedOutput:
    """A row file built from numbered chunks that survive an interruption (see module doc)."""

    def __init__(self, output: Path, fingerprint: dict[str, Any], *, overwrite: bool = False):
        self.output = Path(output)
        _check_suffix(self.output)
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output}: already exists (pass overwrite to replace it)")
        self.parts = self.output.with_name(f".{self.output.name}.parts")
        self.fingerprint = json.loads(json.dumps(fingerprint))
        meta = self.parts / _META
        if meta.is_file():
            started = json.loads(meta.read_text())
            changed = sorted(k for k in {*started, *self.fingerprint}
                             if started.get(k) != self.fingerprint.get(k))
            if changed:
                raise ValueError(f"{self.parts}: holds an interrupted run with other settings "
                                 f"({', '.join(changed)}); delete it to start over")

    def _part(self, chunk: int) -> Path:
        return self.parts / f"part-{chunk:06d}.jsonl"

    def done(self, chunk: int) -> bool:
        """Whether ``chunk`` was finished by this or an earlier run."""
        return self._part(chunk).is_file()

    def write(self, chunk: int, rows: Sequence[dict[str, Any]]) -> None:
        """Record ``chunk`` as finished with its ``rows``."""
        if not (self.parts / _META).is_file():
            meta = json.dumps(self.fingerprint)
            write_atomic(self.parts / _META, lambda tmp: tmp.write_text(meta))
        write_rows(self._part(chunk), rows)

    def finish(self, num_chunks: int) -> Path:
        """Assemble chunks ``0..num_chunks-1`` into the output file and drop the parts."""
        missing = [c for c in range(num_chunks) if not self.done(c)]
        if missing:
            raise ValueError(f"{self.parts}: chunks {missing[:5]} are not finished")
        rows = [row for c in range(num_chunks) for row in read_rows(self._part(c))]
        write_rows(self.output, rows)
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.output


def _check_suffix(path: Path) -> None:
    if path.suffix not in ROW_SUFFIXES:
        raise ValueError(f"{path}: output must end with one of {ROW_SUFFIXES}")
