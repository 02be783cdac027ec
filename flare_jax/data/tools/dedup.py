"""Exact and near-duplicate detection on normalised document text.

Normalisation: Unicode NFKC, case folding, whitespace runs collapsed to one space. Exact duplicates
share the SHA-256 of the normalised text. Near duplicates are found with MinHash LSH (datasketch)
over character shingles, and confirmed by the MinHash estimate of their Jaccard similarity.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Hashable

from datasketch import MinHash, MinHashLSH

from flare_jax.data.records import Record

Key = Hashable


def normalise(text: str) -> str:
    """The text that duplicate detection compares."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def document_text(record: Record) -> str:
    """A record as one string: the text, or ``role: content`` lines of a conversation."""
    if record.is_chat:
        return "\n".join(f"{m.role}: {m.content}" for m in record.messages)
    return record.text


def exact_key(record: Record) -> str:
    """Hash of the normalised text of ``record``."""
    return hashlib.sha256(normalise(document_text(record)).encode("utf-8")).hexdigest()


class NearDuplicateIndex:
    """Documents seen so far, queried for near duplicates (estimated Jaccard >= ``threshold``)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._hashes: dict[Key, MinHash] = {}

    def _minhash(self, text: str) -> MinHash:
        text = normalise(text)
        n = self.shingle
        shingles = {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}
        minhash = MinHash(num_perm=self.num_perm)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def find_or_add(self, key: Key, text: str) -> tuple[Key, float] | None:
        """The most similar earlier document (key, estimated Jaccard) if it is a near duplicate of
        ``text``; otherwise add ``text`` under ``key`` and return None."""
        minhash = self._minhash(text)
        similar = [(other, minhash.jaccard(self._hashes[other]))
                   for other in self._lsh.query(minhash)]
        best = max(similar, key=lambda item: item[1], default=None)
        if best is not None and best[1] >= self.threshold:
            return best
        self._lsh.insert(key, minhash)
        self._hashes[key] = minhash
        return None
