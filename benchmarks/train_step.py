"""Train-step throughput of the Qwen3.5-0.8B shape (random init): the FLARE step next to a plain
causal step of the same model on the same row length, and (``--peer hf``) the HF transformers
torch training step of the same shape. Prints one JSON line per measurement.

  python benchmarks/train_step.py --batch 1 --seq 4096            # JAX: flare + causal
  python benchmarks/train_step.py --peer hf --batch 1 --seq 4096  # HF torch peer

Another shape: ``--config configs/<name>.py`` and ``--override config.a.b=value`` (repeatable),
e.g. a CPU smoke run:
  python benchmarks/train_step.py --config configs/tiny_cpu.py --seq 32 --steps 2 \
      --override config.model.hf_config.num_hidden_layers=4

Several devices: the mesh comes from the config's ``mesh.*`` fields or ``--mesh data,fsdp,tensor``
(one entry may be -1) over all devices of all processes; ``--batch`` is the global batch, split
over the data axes. One process driving every GPU, or one process per GPU through the launcher
(``jax.distributed`` over NCCL; process 0 prints and writes the rows):
  python benchmarks/train_step.py --objective flare --batch 2 --mesh 1,2,1
  python launch/local.py -n 2 --gpus-per-process 1 --exec python -- \
      benchmarks/train_step.py --distributed --objective flare --batch 2 --mesh 1,2,1
Every mesh starts from the same host-drawn parameters (seed 0) and the same global batch, so the
``losses`` of the first steps compare across meshes; ``mfu`` is per device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen3_5_0p8b.py"
H100_PEAK = 989e12  # dense bf16 FLOP/s of one H100 (the H200 has the same)


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


def _global_array(value, sharding):
    """``value`` (the same full array on every process) placed in ``sharding``: each process
    copies in only the slices of its own devices."""
    import jax

    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _host_random_params(config, mesh):
    """N(0, 0.02) fp32 parameters drawn on the host (seed 0: the same values on every mesh and
    process) and placed in their shardings (the jitted ``init_params`` spent 3m45s compiling
    for this shape on the H100; values do not change the step's cost)."""
    import jax
    import numpy as np

    from flare_jax.train.sharding import param_shardings
    from flare_jax.train.step import abstract_params

    rng = np.random.default_rng(0)
    abstract = abstract_params(config)
    return jax.tree.map(
        lambda a, sh: _global_array(0.02 * rng.standard_normal(a.shape, np.float32), sh),
        abstract, param_shardings(abstract, mesh))


def _mesh(cfg, args):
    """The trainer's mesh (``make_mesh``) over all devices of all processes, from ``--mesh`` or
    the config's ``mesh.*`` fields."""
    from flare_jax.train.mesh import make_mesh

    data, fsdp, tensor = args.mesh or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return make_mesh(data=data, fsdp=fsdp, tensor=tensor, expert=cfg.mesh.expert)


def check_batch(rows: int, mesh) -> None:
    """The global batch must split evenly over the mesh's batch axes."""
    from flare_jax.train.sharding import batch_divisor

    if rows % batch_divisor(mesh):
        raise SystemExit(f"--batch {rows} must be a multiple of the batch shards "
                         f"({batch_divisor(mesh)} = mesh data x fsdp x expert) of mesh {dict(mesh.shape)}")


def _time_jax_step(objective: str, backend: str, args) -> dict:
    import jax

    from flare_jax.train import config as train_config
    from flare_jax.train.loop import COMPUTE_DTYPES
    from flare_jax.train.metrics import train_flops_per_row
    from flare_jax.train.optimizer import make_optimizer
    from flare_jax.train.sharding import batch_sharding
    from flare_jax.train.step import (
        ModelBinder,
        StepConfig,
        init_state,
        make_train_step,
        state_shardings,
    )

    cfg, config = _model_config(args)
    mesh = _mesh(cfg, args)
    check_batch(args.batch, mesh)
    remat = cfg.model.remat if args.remat is None else args.remat
    scan_layers = cfg.model.scan_layers if args.scan_layers is None else args.scan_layers
    tx, _ = make_optimizer(learning_rate=1e-5, warmup_steps=10, total_steps=1000,
                           min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                           clip_norm=1.0)
    params = _host_random_params(config, mesh)
    state = init_state(tx, params, mesh)
    step_cfg = StepConfig(block_size=cfg.block_size,
                          noise=train_config.noise_config(cfg, config.mask_token_id),
                          loss=train_config.loss_config(cfg), remat=remat,
                          objective=objective, scan_layers=scan_layers)
    step = make_train_step(ModelBinder(config, COMPUTE_DTYPES[cfg.model.dtype], backend), tx,
                           step_cfg, mesh, state_shardings(tx, params, mesh), seed=0)
    rows = batch_sharding(mesh)
    batch = {k: _global_array(v, rows)
             for k, v in _batch(args.batch, args.seq, config.vocab_size).items()}
    start = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - start
    history = [metrics]
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
        history.append(metrics)
    jax.block_until_ready(history)
    step_s = (time.perf_counter() - start) / args.steps
    devices = mesh.devices.size
    flops = args.batch * train_flops_per_row(config, args.seq, cfg.block_size,
                                             flare=objective == "flare")
    tokens_per_s = args.batch * args.seq / step_s
    return {"impl": f"jax-{objective}", "backend": backend, "scan_layers": scan_layers,
            "remat": remat, "mesh": dict(mesh.shape), "processes": jax.process_count(),
            "devices": devices, "batch": args.batch, "seq": args.seq,
            "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / devices,
            "model_tflops": flops / 1e12, "mfu": flops / step_s / devices / H100_PEAK,
            "compile_s": compile_s, "first_step_s": first_s,
            "losses": [float(m["loss"]) for m in history], **_program_stats(step),
            "device": jax.devices()[0].device_kind}


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _program_stats(compiled) -> dict:
    """Collective ops in the compiled step's HLO (a loop body counted once) and the per-device
    memory XLA planned for it (GiB)."""
    import re

    text = compiled.as_text()
    ops = {name: len(re.findall(rf"\s{name}(?:-start)?\(", text)) for name in COLLECTIVES}
    memory = compiled.memory_analysis()
    sizes = {"memory_gib": {k: getattr(memory, f"{k}_size_in_bytes") / 2**30
                            for k in ("argument", "output", "temp")}} if memory else {}
    return {"collectives": ops, **sizes}


def _is_main() -> bool:
    """Process 0 (or the only process) prints and writes the rows."""
    import jax

    return jax.process_index() == 0


def _print(row: dict) -> None:
    if _is_main():
        print(json.dumps(row), flush=True)


def run_jax(args) -> list[dict]:
    rows = []
    objectives = ("flare", "causal") if args.objective == "both" else (args.objective,)
    for objective in objectives:
        try:
            rows.append(_time_jax_step(objective, args.backend, args))
        except Exception as err:  # noqa: BLE001 (kernels in progress: record and fall back)
            _print({"impl": f"jax-{objective}", "backend": args.backend,
                    "error": f"{type(err).__name__}: {str(err)[:300]}"})
            rows.append(_time_jax_step(objective, "reference", args))
        _print(rows[-1])
    if len(rows) == 2:
        flare, causal = rows
        rows.append({"flare_over_causal_step_time": flare["step_ms"] / causal["step_ms"]})
        _print(rows[-1])
    return rows


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


def _mesh_flag(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(v) for v in text.split(","))
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"--mesh wants data,fsdp,tensor, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["hf"], default=None)
    parser.add_argument("--objective", choices=["flare", "causal", "both"], default="both")
    parser.add_argument("--batch", type=int, default=1, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute layers in the backward pass (default: model.remat)")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                        help="one lax.scan over repeated layer groups (default: "
                             "model.scan_layers)")
    parser.add_argument("--mesh", type=_mesh_flag, default=None,
                        help="data,fsdp,tensor (default: the config's mesh.*)")
    parser.add_argument("--distributed", action="store_true",
                        help="join jax.distributed first (JAX_COORDINATOR_ADDRESS etc., as set "
                             "by launch/local.py, or cluster auto-detection)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="a configs/*.py file")
    parser.add_argument("--override", action="append", default=[],
                        help="config.a.b=value, applied to --config (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the rows as JSON (process 0)")
    args = parser.parse_args()
    if args.distributed:
        from flare_jax.train.mesh import initialize_distributed

        initialize_distributed()
    rows = run_hf(args) if args.peer == "hf" else run_jax(args)
    if args.out is not None and _is_main():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
