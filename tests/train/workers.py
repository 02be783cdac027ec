"""Subprocess workers of the training tests (each runs with its own XLA_FLAGS / process id).

Usage: ``python tests/train/workers.py <loop|meshes|distributed> <out.json> [args]``. Each writes a
JSON result the tests compare.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.py"
ALPHABET = list("abcdefgh ")
LOOP_STEPS = 8  # the loop worker's run length; run_steps uses the same schedule so that its
# 4-device fsdp program is the loop's (one XLA compile, shared through the compilation cache)


def write_corpus(root: Path) -> tuple[Path, Path]:
    """A character tokenizer and a small repetitive jsonl corpus under ``root``."""
    from flare_jax.convert.synthetic import write_char_tokenizer

    write_char_tokenizer(root / "tokenizer", ALPHABET)
    lines = [json.dumps({"text": "abc def gh " * (1 + i % 3)}) for i in range(24)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root / "corpus.jsonl", root / "tokenizer"


def tiny_cfg(root: Path):
    from flare_jax.train import load_config_file

    corpus, tokenizer = write_corpus(root)
    cfg = load_config_file(TINY_CONFIG)
    cfg.data.paths = (str(corpus),)
    cfg.data.tokenizer_dir = str(tokenizer)
    cfg.train.progress = False
    return cfg


def flat_params(params) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(params)])


def loop(out: Path) -> dict:
    """One full run of N steps vs. k steps + resume (fsdp over all devices, as the tiny config
    says); a run initialised from the export; the export loaded back."""
    import flare_jax
    from flare_jax.train import train

    root = out.parent
    cfg = tiny_cfg(root)
    cfg.train.steps, cfg.checkpoint.every = LOOP_STEPS, 4
    cfg.workdir = str(root / "full")
    full = train(cfg)
    cfg.workdir = str(root / "resumed")
    first = train(cfg, stop_after=3)  # checkpoint at 3 (the stop), not at the 'every' grid
    second = train(cfg)
    # A new run initialised from the export: its first loss is the trained model's, not 4.2.
    cfg.workdir, cfg.model.init_from, cfg.data.tokenizer_dir = str(root / "init"), str(
        full.export_dir), ""
    cfg.train.steps, cfg.checkpoint.export = 1, False
    from_export = train(cfg)
    model = flare_jax.load(full.export_dir)
    logits = model.logits([3, 5, 6, 7])
    return {
        "full_losses": [h["loss"] for h in full.history],
        "resumed_losses": [h["loss"] for h in first.history + second.history],
        "full_steps": [h["step"] for h in full.history],
        "resumed_steps": [h["step"] for h in first.history + second.history],
        "params_equal": bool(np.array_equal(flat_params(full.state.params),
                                            flat_params(second.state.params))),
        "first_export": str(first.export_dir),
        "init_from_loss": from_export.history[0]["loss"],
        "export_logits_shape": list(logits.shape),
        "export_logits_finite": bool(np.isfinite(logits).all()),
        "metrics_keys": sorted(full.history[-1]),
    }


def ar_only(mesh) -> dict:
    """One FLARE step with ``diffusion_weight = 0`` and the plain causal LM loss of its batch."""
    from flare_jax.objective import LossConfig, token_cross_entropy
    from flare_jax.pretrained import module_from_params

    batch = fixed_batch(2, 32, 64)
    run = run_steps(mesh, batch, steps=1, loss=LossConfig(ar_weight=1.0, diffusion_weight=0.0),
                    keep_initial=True)
    model = module_from_params(run.pop("model_config"), run.pop("initial_params"),
                               dtype=jnp.float32)
    logits, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    valid = (seg[:, :-1] == seg[:, 1:]) & mask[:, 1:]
    ce = np.asarray(token_cross_entropy(logits[:, :-1], jnp.asarray(batch["tokens"][:, 1:])))
    return {**run, "causal_loss": float(ce[valid].mean()), "causal_tokens": int(valid.sum())}


def fixed_batch(rows: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """A deterministic packed batch: two documents per row, the second a chat-like prompt with
    its first 3 tokens excluded from the loss."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    cut = length // 2 + 3
    segment_ids = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)
    segment_ids = np.broadcast_to(segment_ids, (rows, length)).copy()
    loss_mask = np.ones((rows, length), bool)
    loss_mask[:, cut:cut + 3] = False
    return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask}


def run_steps(mesh, batch: dict[str, np.ndarray], steps: int = 3, grad_accum: int = 1,
              loss=None, keep_initial: bool = False) -> dict:
    """``steps`` FLARE train steps of the tiny model on ``batch`` (this process's rows);
    ``loss`` overrides the config's loss balance."""
    from flare_jax.train import config as train_config
    from flare_jax.train import load_config_file
    from flare_jax.train.optimizer import make_optimizer
    from flare_jax.train.sharding import global_batch
    from flare_jax.train.step import (
        ModelBinder,
        StepConfig,
        init_params,
        init_state,
        make_train_step,
        state_shardings,
    )

    cfg = load_config_file(TINY_CONFIG)
    model_config = train_config.model_config_from(cfg, None)
    o = cfg.optimizer
    tx, _ = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                           total_steps=LOOP_STEPS, min_lr_ratio=o.min_lr_ratio,
                           weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                           clip_norm=o.clip_norm)
    params = init_params(model_config, 0, mesh)
    state = init_state(tx, params, mesh)
    step_cfg = StepConfig(block_size=cfg.block_size,
                          noise=train_config.noise_config(cfg, model_config.mask_token_id),
                          loss=loss or train_config.loss_config(cfg), grad_accum=grad_accum)
    extra = {}
    if keep_initial:  # the step donates the state: copy the initial parameters out first
        extra = {"model_config": model_config,
                 "initial_params": jax.tree.map(np.asarray, params)}
    step_fn = make_train_step(ModelBinder(model_config, jnp.float32, "reference"), tx, step_cfg,
                              mesh, state_shardings(tx, params, mesh), seed=0)
    losses, grad_norms, tokens = [], [], []
    for _ in range(steps):
        state, metrics = step_fn(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        tokens.append([float(metrics["ar_tokens"]), float(metrics["diffusion_tokens"])])
    gathered = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                            state.params) if jax.process_count() > 1 else state.params
    return {"losses": losses, "grad_norms": grad_norms, "tokens": tokens,
            "params": flat_params(gathered).tolist(), **extra}


def meshes(out: Path) -> dict:
    """The same steps on 1 device and on 4-device data, fsdp and fsdp+tensor (with 2 accumulated
    micro-batches) meshes; and the AR-only check (:func:`ar_only`) on 1 device."""
    from flare_jax.train.mesh import make_mesh

    batch = fixed_batch(4, 32, 64)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    runs = {
        "one_device": lambda: run_steps(one, batch),
        "ar_only": lambda: ar_only(one),
        "data": lambda: run_steps(make_mesh(4, 1, 1), batch),
        "fsdp": lambda: run_steps(make_mesh(1, 4, 1), batch),
        "fsdp_tensor_accum2": lambda: run_steps(make_mesh(1, 2, 2), batch, grad_accum=2),
    }
    # Two at a time: XLA compiles (the bulk of the time) release the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def distributed(out: Path, process_id: int, port: int) -> dict:
    """Process ``process_id`` of 2 (2 host devices each) on its half of the global batch."""
    from flare_jax.train.mesh import make_mesh

    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    batch = fixed_batch(4, 32, 64)
    rows = slice(2 * process_id, 2 * (process_id + 1))
    local = {k: v[rows] for k, v in batch.items()}
    result = run_steps(make_mesh(-1, 1, 1), local)
    result["process_count"] = jax.process_count()
    result["device_count"] = jax.device_count()
    return result


if __name__ == "__main__":
    name, out_path = sys.argv[1], Path(sys.argv[2])
    extra = [int(a) for a in sys.argv[3:]]
    workers = {"loop": loop, "meshes": meshes, "distributed": distributed}
    result = workers[name](out_path, *extra)
    out_path.write_text(json.dumps(result))
