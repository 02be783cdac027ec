"""Sequential packing of tokenized documents into rows of ``seq_len`` tokens.

Documents are laid into the current row in stream order. A document longer than ``seq_len`` is
split into pieces of ``seq_len`` tokens (the last piece shorter), each packed as its own document.
A document (or piece) that does not fit in what is left of the row closes the row, whose tail is
padding, and starts the next one. Each row is ``{"tokens": int32[L], "segment_ids": int32[L],
"loss_mask": bool[L]}``: segments numbered 1..n in the row, 0 and no loss on tail padding.

The iterator state is the parent state from before the document being packed plus the offset
reached inside it, so a restored iterator continues with the same rows.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Packs ``{"tokens", "loss_mask"}`` documents into rows of ``seq_len`` tokens."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._doc: dict[str, np.ndarray] | None = None
        self._doc_state: dict[str, Any] | None = None  # parent state before self._doc
        self._offset = 0

    def _fetch(self) -> bool:
        state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            return False
        self._doc, self._doc_state, self._offset = doc, state, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        length = self._seq_len
        tokens = np.full(length, self._pad_id, np.int32)
        segment_ids = np.zeros(length, np.int32)
        loss_mask = np.zeros(length, bool)
        fill, segment = 0, 0
        while fill < length and (self._doc is not None or self._fetch()):
            doc_tokens = self._doc["tokens"]
            piece = min(len(doc_tokens) - self._offset, length)
            if piece == 0:  # an empty document
                self._doc = None
                continue
            if piece > length - fill:
                break
            source = slice(self._offset, self._offset + piece)
            tokens[fill:fill + piece] = doc_tokens[source]
            loss_mask[fill:fill + piece] = self._doc["loss_mask"][source]
            segment += 1
            segment_ids[fill:fill + piece] = segment
            fill += piece
            self._offset += piece
            if self._offset == len(doc_tokens):
                self._doc = None
        if fill == 0:
            raise StopIteration
        return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": -1}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"] >= 0:
            if not self._fetch():
                raise ValueError("iterator state points past the end of its data")
            self._offset = state["offset"]

    def __str__(self) -> str:
        return f"PackDatasetIterator(seq_len={self._seq_len})"
