"""Exact-match generation tasks from local jsonl: ``{"prompt": ..., "answer": ...}`` records (or
chat ``messages`` ending with the user turn), answers extracted GSM8K-style from the generated text,
evaluated in any decoding mode with accuracy, tokens per forward and throughput."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flare_jax.data.sources import json_lines
from flare_jax.sampling.sampler import GenerationResult, Sampler

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class TaskFileError(ValueError):
    """A task file or record is malformed."""


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One prompt (text or chat messages) and its reference answer."""

    prompt: str | tuple[dict[str, str], ...]
    answer: str


def read_task(path: str | Path) -> list[TaskExample]:
    """Read a jsonl task file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found")
    examples = []
    for where, record in json_lines(path, TaskFileError):
        if not isinstance(record, dict) or "answer" not in record:
            raise TaskFileError(f"{where}: expected an object with 'answer' and 'prompt' or "
                                "'messages'")
        if isinstance(record.get("prompt"), str):
            prompt: Any = record["prompt"]
        elif isinstance(record.get("messages"), list):
            prompt = tuple(record["messages"])
        else:
            raise TaskFileError(f"{where}: 'prompt' must be a string or 'messages' a list")
        examples.append(TaskExample(prompt, str(record["answer"])))
    if not examples:
        raise TaskFileError(f"{path}: no records")
    return examples


def extract_answer(text: str) -> str | None:
    """The answer in generated text: after ``####`` if present (GSM8K), else the first number;
    commas inside numbers are dropped."""
    if "####" in text:
        text = text.split("####", 1)[1]
    match = NUMBER.search(text)
    return None if match is None else match.group(0).replace(",", "")


def normalize_answer(answer: str) -> str:
    """Reference answers pass through the same extraction (``"#### 1,234"`` -> ``"1234"``)."""
    extracted = extract_answer(answer)
    return answer.strip() if extracted is None else extracted


@dataclasses.dataclass
class TaskReport:
    """Accuracy and decoding statistics of one mode on one task."""

    mode: str
    examples: int
    accuracy: float
    tokens_per_forward: float
    tokens_per_second: float
    generated_tokens: int
    forward_passes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def generate_for_task(sampler: Sampler, examples: Sequence[TaskExample], *, mode: str = "ar",
                      batch_size: int = 32, max_new_tokens: int = 32, chat: bool = False,
                      **generate_kwargs: Any) -> tuple[list[GenerationResult], float]:
    """Generate for every example in ``mode``, ``batch_size`` prompts per batch; returns the
    results and the elapsed seconds."""
    if not examples:
        raise ValueError("no examples to evaluate")
    results: list[GenerationResult] = []
    start = time.perf_counter()
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        results += sampler.generate([e.prompt for e in chunk], mode=mode, chat=chat,
                                    max_new_tokens=max_new_tokens, **generate_kwargs)
    return results, time.perf_counter() - start


def score_exact_match(results: Sequence[GenerationResult], examples: Sequence[TaskExample],
                      mode: str, elapsed: float) -> TaskReport:
    """Accuracy of the extracted answers and the decoding statistics of ``results``."""
    correct = sum(extract_answer(r.text or "") == normalize_answer(e.answer)
                  for r, e in zip(results, examples, strict=True))
    tokens = sum(len(r.tokens) for r in results)
    passes = sum(r.forward_passes for r in results)
    return TaskReport(mode, len(examples), correct / len(examples), tokens / max(passes, 1),
                      tokens / elapsed, tokens, passes)


def evaluate_exact_match(sampler: Sampler, examples: Sequence[TaskExample], *, mode: str = "ar",
                         batch_size: int = 32, max_new_tokens: int = 32, chat: bool = False,
                         **generate_kwargs: Any) -> TaskReport:
    """Generate for every example in ``mode`` and score extracted answers by exact match."""
    results, elapsed = generate_for_task(sampler, examples, mode=mode, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, chat=chat,
                                         **generate_kwargs)
    return score_exact_match(results, examples, mode, elapsed)
