"""The ``flare data score|select|self-distill`` subcommands (argument parsing only)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _score(args: argparse.Namespace) -> None:
    from flare_jax import load
    from flare_jax.data import DocumentTokenizer
    from flare_jax.data.tools import default_scores_path, score_file

    if args.output is not None and len(args.data) > 1:
        raise ValueError("--output names one file; score several data files with its default")
    model = load(args.checkpoint, dtype=args.dtype)
    tokenizer = DocumentTokenizer.from_dir(str(args.checkpoint))
    for data in args.data:
        output = args.output or default_scores_path(data, args.format)
        out = score_file(data, model, tokenizer, output, batch_size=args.batch_size,
                         chunk_size=args.chunk_size, max_length=args.max_length,
                         overwrite=args.overwrite)
        print(f"wrote {out}")


def _select(args: argparse.Namespace) -> None:
    from flare_jax.data.tools import SourceSpec, select

    weights = args.weight or [1.0] * len(args.data)
    scores = args.scores or [None] * len(args.data)
    if len(weights) != len(args.data) or len(scores) != len(args.data):
        raise ValueError("give --weight (and --scores) once per data file, in the same order")
    sources = [SourceSpec(str(d), w, s) for d, w, s in zip(args.data, weights, scores, strict=True)]
    report = select(sources, args.output, keep=args.keep, dedup=args.dedup,
                    near_threshold=args.near_threshold, total=args.total, seed=args.seed,
                    overwrite=args.overwrite)
    print(report.summary())


def _self_distill(args: argparse.Namespace) -> None:
    from flare_jax import Sampler
    from flare_jax.data import DocumentTokenizer
    from flare_jax.data.tools import GenerationSettings, self_distill

    sampler = Sampler.load(args.checkpoint, dtype=args.dtype)
    tokenizer = DocumentTokenizer.from_dir(str(args.checkpoint))
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  args.seed)
    out = self_distill(args.prompts, sampler, tokenizer, args.output, settings=settings,
                       batch_size=args.batch_size, chunk_size=args.chunk_size,
                       overwrite=args.overwrite)
    print(f"wrote {out}")


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the ``flare`` parser's subcommands."""
    data = commands.add_parser("data", help="transfer data: score, select, self-distill")
    group = data.add_subparsers(dest="data_command", required=True)

    score = group.add_parser("score", help="per-document likelihood stats under the seed model")
    score.add_argument("data", nargs="+", type=Path, help="jsonl / parquet / array_record files")
    score.add_argument("--checkpoint", type=Path, required=True)
    score.add_argument("--output", type=Path, help="default: <name>.scores.<format> next to it")
    score.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--chunk-size", type=int, default=256, help="records per resumable chunk")
    score.add_argument("--max-length", type=int, help="tokens scored per document")
    score.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    score.add_argument("--overwrite", action="store_true")
    score.set_defaults(run=_score)

    select = group.add_parser(
        "select", help="keep by score, dedup, mix sources by weight",
        epilog="Conditions: FIELD OP VALUE or FIELD OP qQUANTILE, OP among >= <= > <, e.g. "
               "--keep 'perplexity<=q0.9' --keep 'response_mean_logprob>=-3'.")
    select.add_argument("data", nargs="+", type=Path)
    select.add_argument("--output", type=Path, required=True, help="output directory")
    select.add_argument("--keep", action="append", default=[], help="a score condition")
    select.add_argument("--weight", action="append", type=float, help="per data file, in order")
    select.add_argument("--scores", action="append", help="per data file (default: next to it)")
    select.add_argument("--dedup", default="near", choices=["none", "exact", "near"])
    select.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity")
    select.add_argument("--total", type=int, help="records in the mixture (default: most "
                                                  "without repeating any source)")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--overwrite", action="store_true")
    select.set_defaults(run=_select)

    distill = group.add_parser("self-distill", help="answer prompts with the seed model (AR)")
    distill.add_argument("prompts", type=Path, help="jsonl of 'prompt' or 'messages' records")
    distill.add_argument("--checkpoint", type=Path, required=True)
    distill.add_argument("--output", type=Path, required=True, help=".jsonl or .parquet")
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--temperature", type=float, default=0.7)
    distill.add_argument("--top-k", type=int, default=0)
    distill.add_argument("--top-p", type=float, default=0.95)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--chunk-size", type=int, default=64, help="prompts per resumable chunk")
    distill.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    distill.add_argument("--overwrite", action="store_true")
    distill.set_defaults(run=_self_distill)
