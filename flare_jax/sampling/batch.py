"""Left-padded prompt batches: token ids, segment ids (0 for padding, 1 for the prompt), positions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

PAD_SEGMENT = 0
PROMPT_SEGMENT = 1


def bucket(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple (shape buckets keep the number of compilations small)."""
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """``tokens``, ``segment_ids``, ``positions``: ``int32 [B, P]``; ``lengths``: ``[B]``."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    @classmethod
    def left_padded(cls, prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8
                    ) -> PromptBatch:
        lengths = np.array([len(p) for p in prompts], np.int32)
        width = bucket(int(lengths.max()), multiple)
        tokens = np.full((len(prompts), width), pad_id, np.int32)
        segment_ids = np.full((len(prompts), width), PAD_SEGMENT, np.int32)
        positions = np.zeros((len(prompts), width), np.int32)
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            tokens[row, width - n:] = prompt
            segment_ids[row, width - n:] = PROMPT_SEGMENT
            positions[row, width - n:] = np.arange(n)
        return cls(tokens, segment_ids, positions, lengths)
