"""The demo's measurements: exact match and tokens per forward of a checkpoint in one or more
decoding modes, and its held-out AR loss."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.demo.report import ResultRow
from flare_jax.demo.settings import DemoSettings
from flare_jax.demo.task import TaskFiles
from flare_jax.eval.generation import generate_for_task, read_task, score_exact_match
from flare_jax.eval.likelihood import corpus_likelihood
from flare_jax.sampling import Sampler

EVAL_BATCH = 64


def decoding_modes(settings: DemoSettings) -> list[tuple[str, str, dict]]:
    """``(label, mode, generate kwargs)`` of every mode the converted model is evaluated in."""
    return [("AR", "ar", {}), ("verified", "verified", {"threshold": settings.thresholds[0]}),
            *[(f"diffusion t={t:g}", "diffusion", {"threshold": t}) for t in settings.thresholds]]


def evaluate_checkpoint(name: str, checkpoint: Path, files: TaskFiles, settings: DemoSettings,
                        modes: Sequence[tuple[str, str, dict]]) -> list[ResultRow]:
    """One row per mode; the first mode must be AR (the reference of ``same_as_ar``, and the row
    that carries the held-out AR loss)."""
    if modes[0][1] != "ar":
        raise ValueError("the first mode must be 'ar'")
    sampler = Sampler.load(checkpoint)
    examples = read_task(files.evaluation)
    rows, ar_texts = [], []
    for label, mode, kwargs in modes:
        results, elapsed = generate_for_task(
            sampler, examples, mode=mode, batch_size=EVAL_BATCH,
            max_new_tokens=settings.task.digits + 1, chat=True, block_size=settings.block_size,
            **kwargs)
        report = score_exact_match(results, examples, mode, elapsed)
        texts = [r.text for r in results]
        if mode == "ar":
            ar_texts, same = texts, None
            tokenizer = DocumentTokenizer.from_dir(str(checkpoint))
            nll = corpus_likelihood(sampler.model, tokenizer, [str(files.heldout)],
                                    max_length=128, batch_size=32).nll
        else:
            same = sum(a == b for a, b in zip(texts, ar_texts, strict=True)) / len(texts)
            nll = None
        rows.append(ResultRow(name, label, report.accuracy, report.tokens_per_forward,
                              report.tokens_per_second, same, nll))
    return rows
