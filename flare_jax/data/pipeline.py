"""The training data pipeline: corpus -> shard -> shuffle -> repeat -> tokenize -> pack -> batch.

Documents are sharded across processes by index (process ``p`` of ``n`` reads documents
``p, p + n, ...``), then shuffled deterministically by ``seed`` (differently each epoch), tokenized,
packed into rows and batched into numpy ``{"tokens", "segment_ids", "loss_mask"}`` arrays of shape
``[batch_size, seq_len]`` per process. The iterator's ``get_state()`` / ``set_state()`` (plain
JSON-able dicts) resume the exact same data order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import jax
import numpy as np

from flare_jax.data.pack import PackIterDataset
from flare_jax.data.records import Record
from flare_jax.data.sources import corpus

Tokenize = Callable[[Record], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
      paths: corpus files or globs (``.jsonl``, ``.parquet``, ``.array_record``).
      seq_len: tokens per packed row.
      batch_size: rows per batch on each process.
      seed: shuffling seed.
      shuffle: shuffle documents (globally within the process's shard, anew each epoch).
      num_epochs: passes over the corpus; None repeats forever.
      pad_id: token id written on tail padding.
      drop_remainder: drop a last batch with fewer than ``batch_size`` rows.
      read_threads: threads reading and tokenizing documents (0 reads in the caller's thread).
      prefetch: batches prepared ahead by a background thread (0: none).
    """

    paths: tuple[str, ...]
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    pad_id: int = 0
    drop_remainder: bool = True
    read_threads: int = 0
    prefetch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.paths, str) or not self.paths:
            raise ValueError(f"paths must be a non-empty sequence of files/globs, got {self.paths!r}")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")
        for name in ("read_threads", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def build_dataset(
    cfg: DataConfig,
    tokenize: Tokenize,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The batched dataset of this process (``jax.process_index()/process_count()`` by default)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} must lie in [0, process_count={count})")
    docs = corpus(cfg.paths)
    if len(docs) < count:
        raise ValueError(f"{len(docs)} documents cannot be sharded over {count} processes")
    docs = docs[index::count]
    if cfg.shuffle:
        docs = docs.shuffle(seed=cfg.seed)
    docs = docs.repeat(cfg.num_epochs).map(tokenize)
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_threads * 4)
    rows = PackIterDataset(docs.to_iter_dataset(read), cfg.seq_len, cfg.pad_id)
    batches = rows.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
    if cfg.prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=cfg.prefetch
        )
    return batches

