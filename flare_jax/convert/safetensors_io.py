"""Streaming reader and writer of (sharded) safetensors files, one tensor in memory at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range in the data section, then the data. Tensors are read with plain file reads
into fresh buffers (no memory map, so resident memory stays at what the caller keeps).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated or malformed."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header."""
    if not path.is_file():
        raise CheckpointFileError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFileError(f"{path}: truncated (no header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointFileError(f"{path}: corrupt header length {header_len} "
                                      f"(file has {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointFileError(f"{path}: header is not valid JSON ({err})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: tensor '{name}' has a malformed header entry "
                                      f"{info!r} (expected dtype, shape, data_offsets)") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise CheckpointFileError(
                f"{path}: tensor '{name}' needs {expected} bytes at [{begin}, {end}) of the data "
                f"section but the file is truncated or the offsets are inconsistent")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint directory: a sharded index or a single ``model.safetensors``."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointFileError(f"{index_path}: malformed index ({err})") from None
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            entries.update(read_header(directory / shard))
        listed_missing = sorted(set(weight_map) - set(entries))
        if listed_missing:
            raise CheckpointFileError(f"{index_path}: tensors listed in the index are absent from "
                                      f"their shards: {listed_missing[:5]}")
        return entries
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointFileError(f"{directory}: no {INDEX_FILE} and no *.safetensors files")
    entries = {}
    for file in files:
        entries.update(read_header(file))
    return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """Read one tensor into a new array."""
    out = np.empty(entry.shape, entry.dtype)
    with entry.file.open("rb") as f:
        f.seek(entry.begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if f.readinto(view) != entry.end - entry.begin:
            raise CheckpointFileError(f"{entry.file}: truncated while reading a tensor")
    return out


def write_sharded(directory: Path, tensors: Iterator[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``(name, array)`` pairs as shards of at most ``max_shard_bytes`` (one tensor may exceed
    it alone) plus the index file; arrays are consumed and released one by one."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    shard_sizes = [0]
    weight_map: dict[str, int] = {}
    total = 0
    for name, array in tensors:
        if shard_sizes[-1] and shard_sizes[-1] + array.nbytes > max_shard_bytes:
            _flush(directory, shards, len(shards) - 1, metadata)
            shards.append([])
            shard_sizes.append(0)
        shards[-1].append((name, array))
        shard_sizes[-1] += array.nbytes
        weight_map[name] = len(shards) - 1
        total += array.nbytes
    _flush(directory, shards, len(shards) - 1, metadata)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    paths = []
    for i, name in enumerate(names):
        os.replace(directory / f".shard-{i}.tmp", directory / name)
        paths.append(directory / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


def _flush(directory: Path, shards: list, i: int, metadata: Mapping[str, str] | None) -> None:
    items = shards[i]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, array in items:
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with (directory / f".shard-{i}.tmp").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, array in items:
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    shards[i] = []
