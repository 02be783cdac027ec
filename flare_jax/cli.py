"""`flare` command line: thin argument parsing over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _convert(args: argparse.Namespace) -> None:
    from flare_jax import convert_hf, export_hf

    if args.direction == "hf-to-jax":
        out = convert_hf(args.source, args.destination, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = export_hf(args.source, args.destination, overwrite=args.overwrite)
    print(f"wrote {out}")


def _decoding_kwargs(args: argparse.Namespace) -> dict:
    """The decoding options shared by `sample` and `eval task` (see :func:`_add_decoding_args`)."""
    return dict(mode=args.mode, max_new_tokens=args.max_new_tokens, stop=args.stop,
                chat=args.chat, block_size=args.block_size, threshold=args.threshold,
                steps_per_block=args.steps_per_block, sub_blocks=args.sub_blocks,
                logit_shift=args.logit_shift)


def _add_decoding_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--mode", default="ar", choices=["ar", "verified", "diffusion"])
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    parser.add_argument("--block-size", type=int, default=8, help="diffusion/verified block size")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="diffusion/verified: commit masked tokens above this confidence")
    parser.add_argument("--steps-per-block", type=int, default=0,
                        help="diffusion/verified: fixed denoising steps per block (0: threshold)")
    parser.add_argument("--sub-blocks", type=int, default=1)
    parser.add_argument("--logit-shift", action="store_true",
                        help="the checkpoint was trained with the diffusion logit shift")


def _sample(args: argparse.Namespace) -> None:
    from flare_jax import Sampler

    sampler = Sampler.load(args.checkpoint, dtype=args.dtype)
    if args.cache_report:
        from flare_jax.model.cache import cache_memory_summary

        print(cache_memory_summary(sampler.model.config, sampler.model.module.dtype,
                                   sampler.model.config.max_position_embeddings))
    prompts = [json.loads(p) if args.token_ids else p for p in args.prompt]
    results = sampler.generate(prompts, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, **_decoding_kwargs(args))
    for prompt, result in zip(args.prompt, results, strict=True):
        print(json.dumps({"prompt": prompt, "text": result.text, "tokens": result.tokens,
                          "finish_reason": result.finish_reason,
                          "forward_passes": result.forward_passes,
                          "tokens_per_forward": round(result.tokens_per_forward, 3)}))


def _train(args: argparse.Namespace) -> None:
    from flare_jax.train import apply_overrides, load_config_file, train
    from flare_jax.train.memory import default_memory_fraction

    default_memory_fraction()

    cfg = load_config_file(args.config)
    apply_overrides(cfg, args.overrides)
    distributed = (args.coordinator_address, args.num_processes, args.process_id,
                   args.local_device_ids)
    if args.distributed or any(v is not None for v in distributed):
        from flare_jax.train.mesh import initialize_distributed

        initialize_distributed(*distributed)
    result = train(cfg)
    if result.export_dir is not None:
        print(f"wrote {result.export_dir}")


def _eval(args: argparse.Namespace) -> None:
    import flare_jax

    if args.kind == "likelihood":
        from flare_jax.data.tokenize import DocumentTokenizer
        from flare_jax.eval.likelihood import corpus_likelihood

        report = corpus_likelihood(flare_jax.load(args.checkpoint, dtype=args.dtype),
                                   DocumentTokenizer.from_dir(str(args.checkpoint)), args.data,
                                   max_length=args.max_length, batch_size=args.batch_size,
                                   limit=args.limit)
    else:
        from flare_jax.eval.generation import evaluate_exact_match, read_task

        report = evaluate_exact_match(
            flare_jax.Sampler.load(args.checkpoint, dtype=args.dtype), read_task(args.task),
            batch_size=args.batch_size, **_decoding_kwargs(args))
    print(json.dumps({"checkpoint": str(args.checkpoint), **report.as_dict()}))


def _demo(args: argparse.Namespace) -> None:
    from flare_jax.demo import DemoSettings
    from flare_jax.demo.pipeline import run_demo

    run_demo(Path(args.workdir), DemoSettings(
        seed_steps=args.seed_steps, flare_steps=args.flare_steps,
        train_examples=args.train_examples, eval_examples=args.eval_examples,
        ablation=args.ablation))


def _demo_defaults():
    from flare_jax.demo import DemoSettings

    return DemoSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="HF safetensors <-> flare-jax checkpoint")
    convert.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    convert.add_argument("source", type=Path)
    convert.add_argument("destination", type=Path)
    convert.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                         help="hf-to-jax: parameter dtype ('auto' keeps the stored dtypes)")
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(run=_convert)

    sample = commands.add_parser("sample", help="generate from a flare-jax checkpoint")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("--prompt", action="append", required=True,
                        help="a prompt (repeat for a batch)")
    sample.add_argument("--token-ids", action="store_true",
                        help="prompts are JSON lists of token ids instead of text")
    _add_decoding_args(sample, max_new_tokens=64)
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.add_argument("--top-k", type=int, default=0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--cache-report", action="store_true",
                        help="print cache memory per token and per request")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sample.set_defaults(run=_sample)

    train = commands.add_parser(
        "train", help="FLARE training from a config file",
        epilog="Override any field with --config.<section>.<field>=<value> (a Python literal).")
    train.add_argument("--config", type=Path, required=True, help="configs/<name>.py")
    train.add_argument("--distributed", action="store_true",
                       help="join jax.distributed: settings from the flags below, else from "
                            "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID / "
                            "JAX_LOCAL_DEVICE_IDS, else auto-detected (SLURM, TPU VMs, Open MPI)")
    train.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="process 0's address (implies --distributed)")
    train.add_argument("--num-processes", type=int, default=None)
    train.add_argument("--process-id", type=int, default=None)
    train.add_argument("--local-device-ids", default=None, metavar="0,1,...",
                       type=lambda s: [int(i) for i in s.split(",")],
                       help="devices of this process (default: all visible)")
    train.set_defaults(run=_train, overrides=[])

    evaluate = commands.add_parser("eval", help="likelihood or exact-match task evaluation")
    kinds = evaluate.add_subparsers(dest="kind", required=True)
    likelihood = kinds.add_parser("likelihood", help="mean token NLL and perplexity of a corpus")
    likelihood.add_argument("--data", action="append", required=True,
                            help="a jsonl / parquet / array_record file (repeat for more)")
    likelihood.add_argument("--max-length", type=int, default=2048,
                            help="longer documents are scored in rolling windows")
    likelihood.add_argument("--limit", type=int, default=None, help="score the first N documents")
    task = kinds.add_parser("task", help="exact-match accuracy of generated answers (GSM8K-style)")
    task.add_argument("--task", type=Path, required=True, help='jsonl of {"prompt", "answer"}')
    _add_decoding_args(task, max_new_tokens=256)
    for kind in (likelihood, task):
        kind.add_argument("checkpoint", type=Path)
        kind.add_argument("--batch-size", type=int, default=8)
        kind.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="the end-to-end demo on an embedded default")
    demo.add_argument("--workdir", default="runs/demo")
    defaults = _demo_defaults()
    for flag, help_text in (("seed-steps", "AR training steps of the seed"),
                            ("flare-steps", "FLARE conversion training steps"),
                            ("train-examples", "generated training examples"),
                            ("eval-examples", "generated evaluation prompts")):
        field = flag.replace("-", "_")
        demo.add_argument(f"--{flag}", type=int, default=getattr(defaults, field),
                          help=f"{help_text} (default %(default)s)")
    demo.add_argument("--ablation", action="store_true",
                      help="also convert on mismatched transfer data (one more row)")
    demo.set_defaults(run=_demo)

    from flare_jax.data.tools.cli import add_data_commands

    add_data_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown and args.command != "train":
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides = unknown
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"flare {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
