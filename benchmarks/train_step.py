"""Train-step throughput of the Qwen3.5-0.8B shape (random init): the FLARE step next to a plain
causal step of the same model on the same row length, and (``--peer hf``) the HF transformers
torch training step of the same shape. Prints one JSON line per measurement.

  python benchmarks/train_step.py --batch 1 --seq 4096            # JAX: flare + causal
  python benchmarks/train_step.py --peer hf --batch 1 --seq 4096  # HF torch peer

Another shape: ``--config configs/<name>.py`` and ``--override config.a.b=value`` (repeatable),
e.g. a CPU smoke run:
  python benchmarks/train_step.py --config configs/tiny_cpu.py --seq 32 --steps 2 \
      --override config.model.hf_config.num_hidden_layers=4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen3_5_0p8b.py"
H100_PEAK = 989e12  # dense bf16 FLOP/s


def _model_config(args):
    from flare_jax.train import apply_overrides, load_config_file
    from flare_jax.train import config as train_config

    cfg = load_config_file(args.config)
    apply_overrides(cfg, args.override)
    if cfg.model.mask_token_id < 0:  # any id of the vocabulary serves for a throughput measurement
        cfg.model.mask_token_id = cfg.model.hf_config.vocab_size - 1
    return cfg, train_config.model_config_from(cfg, None)


def _batch(rows: int, length: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, vocab, (rows, length)).astype(np.int32),
            "segment_ids": np.ones((rows, length), np.int32),
            "loss_mask": np.ones((rows, length), bool)}


def _host_random_params(config, mesh):
    """N(0, 0.02) fp32 parameters drawn on the host and placed in their shardings (the jitted
    ``init_params`` spent 3m45s compiling for this shape on the H100; values do not change the
    step's cost)."""
    import jax
    import numpy as np

    from flare_jax.train.sharding import param_shardings
    from flare_jax.train.step import abstract_params

    rng = np.random.default_rng(0)
    abstract = abstract_params(config)
    return jax.tree.map(
        lambda a, sh: jax.device_put(0.02 * rng.standard_normal(a.shape, np.float32), sh),
        abstract, param_shardings(abstract, mesh))


def _time_jax_step(objective: str, backend: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from flare_jax.train import config as train_config
    from flare_jax.train.mesh import make_mesh
    from flare_jax.train.metrics import train_flops_per_row
    from flare_jax.train.optimizer import make_optimizer
    from flare_jax.train.sharding import global_batch
    from flare_jax.train.step import (
        ModelBinder,
        StepConfig,
        init_state,
        make_train_step,
        state_shardings,
    )

    cfg, config = _model_config(args)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, _ = make_optimizer(learning_rate=1e-5, warmup_steps=10, total_steps=1000,
                           min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                           clip_norm=1.0)
    params = _host_random_params(config, mesh)
    state = init_state(tx, params, mesh)
    step_cfg = StepConfig(block_size=cfg.block_size,
                          noise=train_config.noise_config(cfg, config.mask_token_id),
                          loss=train_config.loss_config(cfg), remat=args.remat,
                          objective=objective, scan_layers=args.scan_layers)
    step = make_train_step(ModelBinder(config, jnp.bfloat16, backend), tx, step_cfg, mesh,
                           state_shardings(tx, params, mesh), seed=0)
    batch = global_batch(_batch(args.batch, args.seq, config.vocab_size), mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    flops = args.batch * train_flops_per_row(config, args.seq, cfg.block_size,
                                             flare=objective == "flare")
    return {"impl": f"jax-{objective}", "backend": backend, "scan_layers": args.scan_layers,
            "remat": args.remat, "batch": args.batch, "seq": args.seq, "step_ms": 1e3 * step_s,
            "tokens_per_s": args.batch * args.seq / step_s, "model_tflops": flops / 1e12,
            "mfu": flops / step_s / H100_PEAK, "first_step_s": compile_s,
            "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind}


def run_jax(args) -> list[dict]:
    rows = []
    for objective in ("flare", "causal"):
        try:
            rows.append(_time_jax_step(objective, args.backend, args))
        except Exception as err:  # noqa: BLE001 (kernels in progress: record and fall back)
            print(json.dumps({"impl": f"jax-{objective}", "backend": args.backend,
                              "error": f"{type(err).__name__}: {str(err)[:300]}"}), flush=True)
            rows.append(_time_jax_step(objective, "reference", args))
        print(json.dumps(rows[-1]), flush=True)
    flare, causal = rows
    ratio = {"flare_over_causal_step_time": flare["step_ms"] / causal["step_ms"]}
    print(json.dumps(ratio), flush=True)
    return [*rows, ratio]


def run_hf(args) -> list[dict]:
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.utils import import_utils

    from flare_jax.convert.jax_to_hf import text_hf_config
    from flare_jax.train.metrics import train_flops_per_row

    cfg, config = _model_config(args)
    hf = text_hf_config(None, config)
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**hf)).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    tokens = torch.as_tensor(_batch(args.batch, args.seq, config.vocab_size)["tokens"],
                             dtype=torch.long, device="cuda")

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    flops = args.batch * train_flops_per_row(config, args.seq, cfg.block_size, flare=False)
    row = {"impl": "hf-torch-causal", "batch": args.batch, "seq": args.seq,
           "step_ms": 1e3 * step_s, "tokens_per_s": args.batch * args.seq / step_s,
           "mfu": flops / step_s / H100_PEAK, "first_step_s": first, "loss": float(loss),
           "fla_available": import_utils.is_flash_linear_attention_available(),
           "device": torch.cuda.get_device_name()}
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer", choices=["hf"], default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="one lax.scan over repeated layer groups (fast compile)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="a configs/*.py file")
    parser.add_argument("--override", action="append", default=[],
                        help="config.a.b=value, applied to --config (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run_hf(args) if args.peer == "hf" else run_jax(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
