"""The demo's generated task: digit strings to transform, with exact answers, written as chat
jsonl (``prompt``/``response`` records) for training and ``prompt``/``answer`` records for
exact-match evaluation.

An answer digit depends only on the prompt (never on earlier answer digits), so a model that has
learned the task can denoise a whole block of it in one pass: the setting where block diffusion
pays off. The chat template is minimal (``<digits>=``), so prompt tokens are few and a FLARE
training row holds several documents.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

ALPHABET = list("0123456789=")
# user turn: the digits then "="; assistant turn: the answer digits (EOS is added by the data
# pipeline). No generation prompt is needed: the user turn already ends with "=".
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}={% else %}"
    "{{ m['content'] }}{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class DigitTask:
    """Prompts of ``digits`` random digits; the answer maps each prompt digit through ``rule``."""

    name: str
    digits: int
    rule: Callable[[np.ndarray], np.ndarray]
    description: str

    def sample(self, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
        """``count`` (prompt, answer) pairs."""
        prompts = ["".join(map(str, p)) for p in rng.integers(0, 10, size=(count, self.digits))]
        return [(p, self.answer(p)) for p in prompts]

    def answer(self, prompt: str) -> str:
        """The answer to one prompt of digits."""
        digits = np.asarray([[int(c) for c in prompt]])
        return "".join(map(str, self.rule(digits)[0]))


def _add_three(digits: np.ndarray) -> np.ndarray:
    return (digits + 3) % 10


def _sort(digits: np.ndarray) -> np.ndarray:
    return np.sort(digits, axis=1)


# 7 digits + EOS: one 8-token block of answer. (Reversing the digits as well made the FLARE
# diffusion loss stall for some seeds within the CPU step budget.)
ADD_THREE = DigitTask("add-3", 7, _add_three, "add 3 to each of 7 digits (mod 10)")
# The ablation's mismatched transfer data: the same prompts, answered by another rule.
SORT = DigitTask("sort", 7, _sort, "sort 7 digits")


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """The jsonl files of one demo run."""

    train: Path
    heldout: Path
    evaluation: Path
    prompts: Path  # the training prompts alone (for self-distillation)


def write_task_files(directory: Path, task: DigitTask, *, train: int, heldout: int,
                     evaluation: int, seed: int) -> TaskFiles:
    """Write disjoint-by-construction samples (one random stream) of the task as jsonl."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = task.sample(rng, train + heldout + evaluation)
    files = TaskFiles(directory / "train.jsonl", directory / "heldout.jsonl",
                      directory / "eval.jsonl", directory / "prompts.jsonl")
    chat = [json.dumps({"prompt": p, "response": a}) for p, a in pairs[:train + heldout]]
    _write_lines(files.train, chat[:train])
    _write_lines(files.heldout, chat[train:])
    _write_lines(files.prompts, [json.dumps({"prompt": p}) for p, _ in pairs[:train]])
    _write_lines(files.evaluation, [json.dumps({"messages": [{"role": "user", "content": p}],
                                                "answer": a})
                                    for p, a in pairs[train + heldout:]])
    return files


def write_relabelled(path: Path, prompts: Path, task: DigitTask) -> Path:
    """Training records for the prompts of ``prompts`` (jsonl) answered by ``task``'s rule."""
    lines = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    _write_lines(path, [json.dumps({"prompt": p, "response": task.answer(p)}) for p in lines])
    return path


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
