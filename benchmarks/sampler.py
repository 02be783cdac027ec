"""Decoding throughput: our AR, verified and diffusion modes next to HF transformers `generate` on
the same random weights, at several concurrencies, in one process.

    python benchmarks/sampler.py --config configs/qwen3_5_0p8b.py --concurrency 1,8,32,64 \
        --modes ar,verified,diffusion2,diffusion4,diffusion8 --new-tokens 128 [--hf] [--json F]

Random weights never emit a stop token (stop tokens are disabled), so every request generates
exactly ``--new-tokens``. Diffusion uses the fixed-steps schedule: ``diffusionK`` denoises a block of
``--block-size`` tokens in ``block_size / K`` steps, i.e. K tokens per denoising pass. Verified mode
on random weights accepts about one token per round (its draft comes from an untrained denoiser):
its figure is the cost floor of verification, not its speed on a FLARE-trained checkpoint.
Each configuration is compiled by a warm-up call, then timed over ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
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
from flare_jax.train.config import load_config_file


def model_config(path: str) -> ModelConfig:
    hf = {"model_type": "qwen3_5_text", **load_config_file(path).model.hf_config.to_dict()}
    config = ModelConfig.from_hf_dict(hf, source=path)
    return ModelConfig.from_dict({**config.to_dict(), "mask_token_id": config.vocab_size - 1})


def mode_kwargs(mode: str, block_size: int) -> dict:
    if mode == "ar":
        return dict(mode="ar")
    if mode == "verified":  # one denoising pass drafts the whole block, one causal pass checks it
        return dict(mode="verified", block_size=block_size, steps_per_block=1)
    per_pass = int(mode.removeprefix("diffusion"))
    return dict(mode="diffusion", block_size=block_size, steps_per_block=block_size // per_pass)


def time_ours(sampler: Sampler, prompts: list[list[int]], kwargs: dict, new_tokens: int,
              repeats: int) -> tuple[float, float]:
    """(output tokens per second, mean tokens per forward) over ``repeats`` timed calls."""
    sampler.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[], **kwargs)  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        results = sampler.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[], **kwargs)
    elapsed = (time.perf_counter() - start) / repeats
    return len(prompts) * new_tokens / elapsed, float(np.mean([r.tokens_per_forward for r in results]))


def time_hf(hf_dir: Path, prompts: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers import Qwen3_5ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = Qwen3_5ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        sync()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        sync()
    elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/qwen3_5_0p8b.py")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--modes", default="ar,verified,diffusion2,diffusion4,diffusion8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="auto", help="kernel backend: auto | reference")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers generate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = model_config(args.config)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    module = HybridLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                      backend=args.backend)
    sampler = Sampler(Model(config, module))
    print(f"device: {jax.devices()[0].device_kind}; model: {args.config} "
          f"({sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))) / 1e9:.2f}B "
          f"params, {args.dtype}, kernels {args.backend}); prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}")
    rng = np.random.default_rng(0)
    rows = []
    hf_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.hf:
            ckpt = Path(tmp) / "ckpt"
            ckpt.mkdir()
            save_params(ckpt / PARAMS_DIR, jax.tree.map(np.asarray, module_params(module)))
            write_model_config(ckpt, config, None)
            hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            prompts = rng.integers(10, config.vocab_size - 10,
                                   size=(concurrency, args.prompt_len)).tolist()
            row = {"concurrency": concurrency}
            for mode in args.modes.split(","):
                tps, tpf = time_ours(sampler, prompts, mode_kwargs(mode, args.block_size),
                                     args.new_tokens, args.repeats)
                row[mode] = tps
                row[f"{mode}_tokens_per_forward"] = tpf
                print(f"  c={concurrency:<3} {mode:<11} {tps:10.1f} tok/s  {tpf:.2f} tok/fwd",
                      flush=True)
            if hf_dir is not None:
                row["hf_generate"] = time_hf(hf_dir, prompts, args.new_tokens)
                print(f"  c={concurrency:<3} hf_generate {row['hf_generate']:10.1f} tok/s",
                      flush=True)
            rows.append(row)
    print("\nconcurrency | " + " | ".join(f"{m} tok/s" for m in args.modes.split(",")) +
          (" | HF tok/s | ar / HF" if args.hf else ""))
    for row in rows:
        cells = [f"{row[m]:.1f}" for m in args.modes.split(",")]
        if args.hf:
            cells += [f"{row['hf_generate']:.1f}", f"{row['ar'] / row['hf_generate']:.2f}x"
                      if "ar" in row else "-"]
        print(f"{row['concurrency']} | " + " | ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
