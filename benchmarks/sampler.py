"""Decoding throughput: our AR, verified and diffusion modes next to HF transformers `generate` on
the same random weights, at several concurrencies, in one run.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/sampler.py \
        --config configs/qwen3_5_0p8b.py --concurrency 1,8,32,64 \
        --modes ar,diffusion4,verified,diffusion2,diffusion8 --new-tokens 64 [--hf] [--json F]

(JAX must not preallocate the GPU: torch and several worker processes share it.)

Random weights never emit a stop token (stop tokens are disabled), so every request generates
exactly ``--new-tokens``. Diffusion uses the fixed-steps schedule: ``diffusionK`` denoises a block
of ``--block-size`` tokens in ``block_size / K`` steps, i.e. K tokens per denoising pass. Verified
mode on random weights accepts about one token per round (its draft comes from an untrained
denoiser): its figure is the cost floor of verification, not its speed on a FLARE-trained
checkpoint.

Compilation dominates the wall time (tracing one program of this model takes ~20 s on the device
host, and the GIL serialises tracing in threads), so: the HF peer runs first, alone; then every
configuration (``--modes`` x ``--concurrency``, or the ``--only`` pairs) gets its own process that
builds the same random model, traces and compiles its :func:`generate_batch` program (what
``Sampler.generate`` runs) in parallel with the others, waits until all have compiled (or
``--quiet-by-s``; the JSON names timings that overlapped compiles) and is then timed while holding
a lock (best of ``--repeats`` runs after a warm-up run). Results are written to ``--json`` as they
arrive; workers still running at ``--budget-s`` are stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax.checkpoint import PARAMS_DIR, save_params, write_model_config
from flare_jax.config import ModelConfig
from flare_jax.convert.jax_to_hf import export_hf
from flare_jax.model.hybrid import HybridLM
from flare_jax.pretrained import Model, module_params
from flare_jax.sampling import Sampler
from flare_jax.sampling.loop import generate_batch
from flare_jax.train.config import load_config_file


def model_config(path: str) -> ModelConfig:
    hf = {"model_type": "qwen3_5_text", **load_config_file(path).model.hf_config.to_dict()}
    config = ModelConfig.from_hf_dict(hf, source=path)
    return ModelConfig.from_dict({**config.to_dict(), "mask_token_id": config.vocab_size - 1})


def mode_kwargs(mode: str, block_size: int) -> dict:
    """``Sampler.decode_settings`` arguments of a benchmark mode name."""
    base = dict(temperature=0.0, top_k=0, top_p=1.0, block_size=block_size, sub_blocks=1,
                logit_shift=False)
    if mode == "ar":
        return dict(base, mode="ar", steps_per_block=0)
    if mode == "verified":  # one denoising pass drafts the whole block, one causal pass checks it
        return dict(base, mode="verified", steps_per_block=1)
    per_pass = int(mode.removeprefix("diffusion"))
    return dict(base, mode="diffusion", steps_per_block=block_size // per_pass)


def time_program(compiled, args: tuple, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(output tokens per second, mean tokens per forward pass incl. prefill): best of
    ``repeats`` runs after a warm-up run."""
    jax.block_until_ready(compiled(*args[1:]))  # args[0], the graph definition, is static
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, num_new, passes = (np.asarray(x) for x in compiled(*args[1:]))
        best = min(best, time.perf_counter() - start)
    assert (num_new == new_tokens).all(), num_new
    return num_new.sum() / best, float(np.mean(num_new / passes))


def timed(fn):
    """``(fn(), seconds it took)``."""
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def hf_kernels() -> str:
    """Whether HF's linear-attention layers could pick up fla (HF imports it when installed and
    otherwise falls back to its PyTorch reference, saying so in its log)."""
    loaded = sorted(n for n in sys.modules if n.startswith("fla.ops.gated_delta_rule"))
    version = getattr(sys.modules.get("fla"), "__version__", None)
    return f"fla {version}: gated delta rule modules loaded by HF: {loaded or 'none'}"


def time_hf(hf_dir: Path, prompts: dict[int, list[list[int]]], new_tokens: int,
            report) -> str:
    """HF ``generate`` (greedy, exactly ``new_tokens`` each) tokens/s per concurrency, reported
    through ``report(concurrency, tok_s)``; returns :func:`hf_kernels`."""
    os.environ["TRITON_CACHE_DIR"] = os.environ.get("TRITON_CACHE_DIR") or "/tmp/triton"
    import torch
    from transformers import Qwen3_5ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = Qwen3_5ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    for concurrency, rows in prompts.items():
        ids = torch.tensor(rows, device=device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            sync()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            sync()
        report(concurrency, len(rows) * new_tokens / (time.perf_counter() - start))
    kernels = hf_kernels()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return kernels


def build_sampler(args: argparse.Namespace) -> Sampler:
    """The benchmark model (random weights from a fixed seed: every process builds the same)."""
    config = model_config(args.config)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    module = HybridLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                      backend=args.backend)
    return Sampler(Model(config, module))


def worker(args: argparse.Namespace, mode: str, batch: list[list[int]], began: float,
           barrier, lock, results) -> None:
    """One configuration in its own process: trace and compile its program, wait until every
    worker has compiled (or ``--quiet-by-s``), then time it while holding ``lock``."""
    row = dict(mode=mode, concurrency=len(batch))
    compiled = None
    try:
        sampler = build_sampler(args)
        settings = sampler.decode_settings(**mode_kwargs(mode, args.block_size))
        call, static = sampler.batch_arguments(batch, settings, args.new_tokens, (), 0.9, 0)
        compiled, row["prepare_s"] = timed(lambda: generate_batch.lower(*call, **static).compile())
    except Exception as error:  # noqa: BLE001 - reported, and the barrier still counts us
        row["error"] = repr(error)[:2000]
    try:
        barrier.wait(timeout=max(args.quiet_by_s - (time.time() - began), 0.0))
    except threading.BrokenBarrierError:
        row["timed_while_others_compiled"] = True
    if compiled is not None:
        with lock:
            row["tok_s"], row["tok_fwd"] = time_program(compiled, call, args.new_tokens,
                                                        args.repeats)
        row["device"] = jax.devices()[0].device_kind
    results.put(row)


def print_table(rows: dict[int, dict], modes: list[str]) -> None:
    cols = [m for m in modes if any(m in r for r in rows.values())]
    has_hf = any("hf_generate" in r for r in rows.values())
    print("\nconcurrency | " + " | ".join(f"{m} tok/s (tok/fwd)" for m in cols) +
          (" | HF tok/s | ar / HF" if has_hf else ""))
    for concurrency, row in rows.items():
        cells = [f"{row[m]:.1f} ({row[m + '_tokens_per_forward']:.2f})" if m in row else "-"
                 for m in cols]
        if has_hf:
            hf = row.get("hf_generate")
            cells += [f"{hf:.1f}" if hf else "-",
                      f"{row['ar'] / hf:.2f}x" if hf and "ar" in row else "-"]
        print(f"{concurrency} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/qwen3_5_0p8b.py")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--modes", default="ar,diffusion4,verified,diffusion2,diffusion8")
    parser.add_argument("--only", default="",
                        help="comma-separated mode@concurrency pairs to run instead of the grid")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-by-s", type=float, default=1e9,
                        help="start timing by then even if other workers are still compiling")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="stop collecting results after this many seconds")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="auto", help="kernel backend: auto | reference")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers generate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    began = time.time()
    config = model_config(args.config)
    modes = args.modes.split(",")
    rng = np.random.default_rng(0)
    prompts = {c: rng.integers(10, config.vocab_size - 10, size=(c, args.prompt_len)).tolist()
               for c in (int(c) for c in args.concurrency.split(","))}
    pairs = ([(m, int(c)) for m, c in (p.split("@") for p in args.only.split(","))] if args.only
             else [(m, c) for m in modes for c in prompts])
    rows: dict[int, dict] = {c: {"concurrency": c} for c in prompts}
    meta = dict(config=args.config, dtype=args.dtype, backend=args.backend,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                block_size=args.block_size)

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2))

    def report(concurrency: int, name: str, tok_s: float, tok_fwd: float | None = None) -> None:
        rows[concurrency][name] = tok_s
        if tok_fwd is not None:
            rows[concurrency][f"{name}_tokens_per_forward"] = tok_fwd
        print(f"  [{time.time() - began:6.1f}s] c={concurrency:<3} {name:<11} "
              f"{tok_s:10.1f} tok/s" + (f"  {tok_fwd:.2f} tok/fwd" if tok_fwd else ""), flush=True)
        save()

    if args.hf:  # first, alone on the machine
        module = build_sampler(args).model.module
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            ckpt.mkdir()
            save_params(ckpt / PARAMS_DIR, jax.tree.map(np.asarray, module_params(module)))
            write_model_config(ckpt, config, None)
            hf_dir = export_hf(ckpt, Path(tmp) / "hf")
            del module
            try:  # a failing peer must not cost the rest of the table
                meta["hf_kernels"] = time_hf(hf_dir, prompts, args.new_tokens,
                                             lambda c, tok_s: report(c, "hf_generate", tok_s))
            except Exception as error:  # noqa: BLE001
                meta["hf_error"] = repr(error)
            print(meta.get("hf_kernels", meta.get("hf_error")), flush=True)

    context = multiprocessing.get_context("spawn")
    barrier, lock, results = context.Barrier(len(pairs)), context.Lock(), context.Queue()
    workers = [context.Process(target=worker, args=(args, mode, prompts[c], began, barrier, lock,
                                                    results)) for mode, c in pairs]
    for process in workers:
        process.start()
    for _ in pairs:
        try:
            row = results.get(timeout=min(max(args.budget_s - (time.time() - began), 0.1),
                                          threading.TIMEOUT_MAX))
        except queue.Empty:
            print(f"  [{time.time() - began:6.1f}s] budget reached", flush=True)
            break
        name = f"{row['mode']}@{row['concurrency']}"
        for key in ("prepare_s", "error", "timed_while_others_compiled", "device"):
            if key in row:
                meta.setdefault(key, {})[name] = row[key]
        if "tok_s" in row:
            report(row["concurrency"], row["mode"], row["tok_s"], row["tok_fwd"])
        else:
            print(f"  {name} failed: {row.get('error')}", flush=True)
            save()
    for process in workers:
        if process.is_alive():
            process.terminate()
    print_table(rows, modes)
    save()


if __name__ == "__main__":
    main()
