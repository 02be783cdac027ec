"""Subprocess workers of the training tests (each runs with its own XLA_FLAGS / process id).

Usage: ``python tests/train/workers.py <name> <out.json> [args]``; ``layouts`` and ``train_cli``
run in the processes of a ``launch/local.py`` job. Each writes a JSON result
the tests compare.
"""

from __future__ import annotations

import dataclasses
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


def tiny_training(loss=None, grad_accum: int = 1, token_chunk: int = 0):
    """The tiny config's model config, optimizer and step config (``LOOP_STEPS`` schedule);
    ``loss`` overrides the config's loss balance, ``token_chunk`` the head's cross-entropy
    (``StepConfig.token_chunk``)."""
    from flare_jax.train import config as train_config
    from flare_jax.train import load_config_file
    from flare_jax.train.optimizer import make_optimizer
    from flare_jax.train.step import StepConfig

    cfg = load_config_file(TINY_CONFIG)
    model_config = train_config.model_config_from(cfg, None)
    o = cfg.optimizer
    tx, _ = make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                           total_steps=LOOP_STEPS, min_lr_ratio=o.min_lr_ratio,
                           weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                           clip_norm=o.clip_norm)
    step_cfg = StepConfig(block_size=cfg.block_size,
                          noise=train_config.noise_config(cfg, model_config.mask_token_id),
                          loss=loss or train_config.loss_config(cfg), grad_accum=grad_accum,
                          token_chunk=token_chunk)
    return model_config, tx, step_cfg


def train_steps(state, mesh, batch: dict[str, np.ndarray], steps: int, training) -> tuple:
    """``steps`` train steps from ``state`` on ``batch`` (this process's rows); the final state
    and the per-step losses, gradient norms and token counts."""
    from flare_jax.train.sharding import global_batch
    from flare_jax.train.step import ModelBinder, make_train_step, state_shardings

    model_config, tx, step_cfg = training
    step_fn = make_train_step(ModelBinder(model_config, jnp.float32, "reference"), tx, step_cfg,
                              mesh, state_shardings(tx, state.params, mesh), seed=0)
    losses, grad_norms, tokens = [], [], []
    for _ in range(steps):
        state, metrics = step_fn(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        tokens.append([float(metrics["ar_tokens"]), float(metrics["diffusion_tokens"])])
    return state, {"losses": losses, "grad_norms": grad_norms, "tokens": tokens}


def run_steps(mesh, batch: dict[str, np.ndarray], steps: int = 3, grad_accum: int = 1,
              loss=None, keep_initial: bool = False, token_chunk: int = 0) -> dict:
    """``steps`` FLARE train steps of the tiny model from its seed-0 init on ``batch`` (this
    process's rows); ``loss`` and ``token_chunk`` as in :func:`tiny_training`."""
    from flare_jax.train.init import init_params
    from flare_jax.train.step import init_state

    training = tiny_training(loss, grad_accum, token_chunk)
    model_config, tx, _ = training
    params = init_params(model_config, 0, mesh)
    extra = {}
    if keep_initial:  # the step donates the state: copy the initial parameters out first
        extra = {"model_config": model_config,
                 "initial_params": jax.tree.map(np.asarray, params)}
    state, result = train_steps(init_state(tx, params, mesh), mesh, batch, steps, training)
    gathered = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                            state.params) if jax.process_count() > 1 else state.params
    return {**result, "params": flat_params(gathered).tolist(), **extra}


def meshes(out: Path) -> dict:
    """The same steps on 1 device and on 4-device data, fsdp and fsdp+tensor (with 2 accumulated
    micro-batches; and with the head's cross-entropy over position chunks) meshes; and the
    AR-only check (:func:`ar_only`) on 1 device."""
    from flare_jax.train.mesh import make_mesh

    batch = fixed_batch(4, 32, 64)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    runs = {
        "one_device": lambda: run_steps(one, batch),
        "ar_only": lambda: ar_only(one),
        "data": lambda: run_steps(make_mesh(4, 1, 1), batch),
        "fsdp": lambda: run_steps(make_mesh(1, 4, 1), batch),
        "fsdp_tensor_accum2": lambda: run_steps(make_mesh(1, 2, 2), batch, grad_accum=2),
        # 4 rows, both streams side by side: 63 positions in steps of 2 per row (the last padded)
        "fsdp_tensor_token_chunks": lambda: run_steps(make_mesh(1, 2, 2), batch, token_chunk=8),
    }
    # Two at a time: XLA compiles (the bulk of the time) release the GIL.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        return {name: future.result() for name, future in futures.items()}


# The tiny config's model with a mixture of experts in both layers (4 experts, top-2) and a router
# loss weight large enough to move the parameters visibly.
TINY_MOE_FIELDS = dict(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=16)
ROUTER_WEIGHT = 0.05


def moe_run(mesh, batch: dict[str, np.ndarray], steps: int, router_weight: float = ROUTER_WEIGHT,
            grad_accum: int = 1) -> dict:
    """``steps`` FLARE train steps of the tiny MoE model from its seed-0 init with plain SGD at
    learning rate 1 (an update is minus the gradient): every step's metrics, the first step's
    gradients and the initial and final parameters (nested numpy trees)."""
    import optax

    from flare_jax.config import ModelConfig
    from flare_jax.train.init import init_params
    from flare_jax.train.sharding import global_batch
    from flare_jax.train.step import (
        ModelBinder,
        init_state,
        make_train_step,
        state_shardings,
    )

    _, _, step_cfg = tiny_training(grad_accum=grad_accum)
    step_cfg = dataclasses.replace(step_cfg, loss=dataclasses.replace(
        step_cfg.loss, router_aux_weight=router_weight))
    model_config = ModelConfig.from_dict({**tiny_training()[0].to_dict(), **TINY_MOE_FIELDS})
    tx = optax.sgd(1.0)
    params = init_params(model_config, 0, mesh)
    host = {"initial": jax.tree.map(np.asarray, params)}
    step_fn = make_train_step(ModelBinder(model_config, jnp.float32, "reference"), tx, step_cfg,
                              mesh, state_shardings(tx, params, mesh), seed=0)
    state, metrics = init_state(tx, params, mesh), []
    for _ in range(steps):
        state, step_metrics = step_fn(state, global_batch(batch, mesh))
        metrics.append({k: float(v) for k, v in step_metrics.items()})
        if "gradients" not in host:
            host["gradients"] = jax.tree.map(lambda a, b: a - np.asarray(b), host["initial"],
                                             state.params)
    host["final"] = jax.tree.map(np.asarray, state.params)
    return {"metrics": metrics, "model_config": model_config, "step_config": step_cfg, **host,
            "expert_spec": str(state.params["layers"]["0"]["mlp"]["experts"]["up_proj"]
                               .sharding.spec)}


def reference_gradients(run: dict, batch: dict[str, np.ndarray]) -> tuple:
    """The FLARE loss ``ce`` and the model-level load-balancing loss ``aux`` (loss tokens of both
    streams) at a :func:`moe_run`'s initial parameters on its first step's noised batch, and
    ``jax.grad`` of ``ce + w * aux`` at ``w = 0`` and :data:`ROUTER_WEIGHT` (one program):
    ``(ce, aux, grads at 0, grads at ROUTER_WEIGHT)``."""
    from flare_jax.layout import FlareLayout
    from flare_jax.model.moe import load_balancing_loss
    from flare_jax.objective import add_noise, flare_loss
    from flare_jax.train.step import ModelBinder

    cfg = run["step_config"]
    tokens, segment_ids = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
    loss_mask = jnp.asarray(batch["loss_mask"])
    layout = FlareLayout.from_segments(segment_ids, cfg.block_size)
    noisy, noise_mask, rate = add_noise(jax.random.fold_in(jax.random.key(0), 0), tokens, layout,
                                        loss_mask, cfg.noise)
    binder = ModelBinder(run["model_config"], jnp.float32, "reference")

    def objective(params, weight):
        clean, noised, stats = binder(params).flare(tokens, noisy, layout, token_mask=loss_mask,
                                                    with_router_stats=True)
        ce, _ = flare_loss(clean, noised, tokens, noise_mask, loss_mask, segment_ids, rate,
                           cfg.loss)
        aux = load_balancing_loss(stats)
        return ce + weight * aux, (ce, aux)

    grad_fn = jax.jit(jax.grad(objective, has_aux=True))
    plain, (ce, aux) = grad_fn(run["initial"], 0.0)
    weighted, _ = grad_fn(run["initial"], ROUTER_WEIGHT)
    return float(ce), float(aux), plain, weighted


def moe_meshes(out: Path) -> dict:
    """The tiny MoE model (4 devices, SGD): 3 FLARE steps on 1 device and on a (fsdp 2, expert 2)
    mesh; one step with 2 accumulated micro-batches; one step at router weight 0; the gradients
    of the plain loss and of the router loss computed directly (:func:`reference_gradients`)."""
    from flare_jax.train.mesh import make_mesh

    batch = fixed_batch(4, 32, 64)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    jobs = {
        "one_device": lambda: moe_run(one, batch, steps=3),
        "expert_fsdp": lambda: moe_run(make_mesh(1, 2, 1, expert=2), batch, steps=3),
        "accum2": lambda: moe_run(one, batch, steps=1, grad_accum=2),
        "weight0": lambda: moe_run(one, batch, steps=1, router_weight=0.0),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        runs = {name: future.result() for name, future in futures.items()}
    ce, aux, ce_grads, expected = reference_gradients(runs["one_device"], batch)

    def router(tree) -> np.ndarray:
        return np.stack([np.asarray(tree["layers"][i]["mlp"]["gate"]["kernel"]) for i in "01"])

    def gap(a, b) -> float:
        return float(np.abs(flat_params(a) - flat_params(b)).max())

    one_run = runs["one_device"]
    return {
        **{name: {"metrics": run["metrics"], "params": flat_params(run["final"]).tolist(),
                  "expert_spec": run["expert_spec"]} for name, run in runs.items()},
        "reference": {"ce": ce, "aux": aux, "grad_scale": float(np.abs(flat_params(ce_grads)).max()),
                      "weight0_vs_ce": gap(runs["weight0"]["gradients"], ce_grads),
                      "weighted_vs_expected": gap(one_run["gradients"], expected),
                      "accum2_vs_full": gap(runs["accum2"]["gradients"], one_run["gradients"]),
                      "router_effect": float(np.abs(router(one_run["gradients"])
                                                    - router(runs["weight0"]["gradients"])).max())},
    }


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's consecutive share of the global batch rows."""
    rows = len(batch["tokens"]) // jax.process_count()
    part = slice(rows * jax.process_index(), rows * (jax.process_index() + 1))
    return {k: v[part] for k, v in batch.items()}


# The meshes of the process-layout runs (data, fsdp, tensor) over 8 devices.
LAYOUT_MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tensor": (1, 4, 2)}
LAYOUT_STEPS = 3
INIT_STEP, SAVED_STEP = 0, LAYOUT_STEPS  # checkpoint steps: the initial and the trained state


def _state_template(training, mesh):
    """Abstract train state of the tiny model in the shardings of ``mesh``."""
    from flare_jax.train.checkpointing import abstract_like
    from flare_jax.train.step import TrainState, abstract_params, state_shardings

    model_config, tx, _ = training
    params = abstract_params(model_config)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                          jax.eval_shape(tx.init, params))
    return abstract_like(abstract, state_shardings(tx, params, mesh))


def host_leaves(state) -> list[np.ndarray]:
    """Every leaf of a (single-process) train state as a numpy array."""
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def shard_mismatch(state, reference: list[np.ndarray], exact: bool) -> float:
    """Largest difference between this process's shards of ``state`` and the same slices of
    ``reference`` (full arrays); ``inf`` on a shape or dtype difference; no gathering."""
    worst = 0.0
    for leaf, ref in zip(jax.tree.leaves(state), reference, strict=True):
        if leaf.shape != ref.shape or leaf.dtype != ref.dtype:
            return float("inf")
        for shard in leaf.addressable_shards:
            got, want = np.asarray(shard.data), ref[shard.index]
            if exact:
                same = np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()
                worst = max(worst, 0.0 if same else 1.0)
            else:
                worst = max(worst, float(np.max(np.abs(got - want), initial=0.0)))
    return worst


def layouts(out: Path, shared: Path, meshes: Path | None = None) -> dict:
    """A process of a ``launch/local.py`` job over 8 devices in all (1 x 8, 2 x 4 or 4 x 2):
    3 FLARE steps on the data, fsdp and fsdp+tensor meshes (or the comma-separated ``meshes``;
    the first job runs all), each starting from the initial state
    in the Orbax checkpoint under ``shared`` (the first job, 1 x 8, writes it). The 1 x 8 job also
    saves the fsdp run's final state (step 3) and numpy copies of the states; the others compare
    their final states with those and restore the saved step onto their fsdp+tensor mesh."""
    from flare_jax.train.checkpointing import Checkpointer
    from flare_jax.train.init import init_params
    from flare_jax.train.mesh import initialize_distributed, make_mesh
    from flare_jax.train.step import init_state

    initialize_distributed()
    training = tiny_training()
    checkpointer = Checkpointer(shared / "checkpoints", keep=2, async_save=False)
    first = checkpointer.latest_step() is None
    if first:
        mesh = make_mesh(*LAYOUT_MESHES["fsdp"])
        checkpointer.save(INIT_STEP, init_state(training[1], init_params(training[0], 0, mesh),
                                                mesh), {})
    batch = local_rows(fixed_batch(8, 32, 64))
    result: dict = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    names = list(LAYOUT_MESHES) if first or meshes is None else str(meshes).split(",")
    for name in names:
        mesh = make_mesh(*LAYOUT_MESHES[name])
        state = checkpointer.restore(INIT_STEP, _state_template(training, mesh))
        state, result[name] = train_steps(state, mesh, batch, LAYOUT_STEPS, training)
        if first:
            np.savez(shared / f"{name}.npz", *host_leaves(state))
            if name == "fsdp":
                checkpointer.save(SAVED_STEP, state, {})
        else:
            reference = list(np.load(shared / f"{name}.npz").values())
            result[name]["state_max_diff"] = shard_mismatch(state, reference, exact=False)
    if not first:
        mesh = make_mesh(*LAYOUT_MESHES["fsdp_tensor"])
        restored = checkpointer.restore(SAVED_STEP, _state_template(training, mesh))
        reference = list(np.load(shared / "fsdp.npz").values())
        result["restored_mismatch"] = shard_mismatch(restored, reference, exact=True)
    checkpointer.close()
    return result


def restore(out: Path, shared: Path) -> dict:
    """One process (4 devices): the step saved by the 1 x 8 fsdp run restored onto a 4-device
    fsdp and a 2 x 2 fsdp+tensor mesh; bitwise comparison with the saved numpy copy."""
    from flare_jax.train.checkpointing import Checkpointer
    from flare_jax.train.mesh import make_mesh

    training = tiny_training()
    checkpointer = Checkpointer(shared / "checkpoints", keep=2, async_save=False)
    reference = list(np.load(shared / "fsdp.npz").values())
    result = {"device_count": jax.device_count(), "latest": checkpointer.latest_step()}
    for name, shape in {"fsdp4": (1, 4, 1), "fsdp2_tensor2": (1, 2, 2)}.items():
        state = checkpointer.restore(SAVED_STEP, _state_template(training, make_mesh(*shape)))
        result[name] = {
            "mismatch": shard_mismatch(state, reference, exact=True),
            "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)}),
            "opt_leaves": len(jax.tree.leaves(state.opt_state)),
        }
    return result


def train_cli(out: Path, signal_at: int, signum: int, hold_save: int, *argv: str) -> None:
    """``flare train`` (in a ``launch/local.py`` job) with preemption hooks: send ``signum`` to
    this process right after dispatching the step that ends at ``signal_at``; block inside the
    save of step ``hold_save`` (its temporary directory exists, nothing is committed) after
    writing the marker ``out``. 0 disables a hook."""
    import os
    import time

    from flare_jax import cli
    from flare_jax.train import checkpointing, loop

    make_train_step = loop.make_train_step

    def killing_step(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def run(state, batch):
            ending = int(state.step) + 1
            state, metrics = step_fn(state, batch)
            if ending == signal_at:
                os.kill(os.getpid(), signum)
                # Let the preemption notice reach JAX's coordination service before the next
                # steps are dispatched: on a loaded machine the short run could otherwise end
                # before any step sees it.
                time.sleep(2)
            return state, metrics

        return run

    def held_snapshot(self) -> bytes:
        out.write_text(str(hold_save))
        time.sleep(600)
        return b""

    save = checkpointing.Checkpointer.save

    def holding_save(self, step, state, data_state):
        if step == hold_save:
            checkpointing._IteratorSnapshot.get_state = held_snapshot
        save(self, step, state, data_state)

    loop.make_train_step = killing_step
    checkpointing.Checkpointer.save = holding_save
    sys.exit(cli.main(["train", "--distributed", *argv]))


if __name__ == "__main__":
    name, out_path = sys.argv[1], Path(sys.argv[2])
    if name == "train_cli":
        train_cli(out_path, *map(int, sys.argv[3:6]), *sys.argv[6:])
    workers = {"loop": loop, "meshes": meshes, "layouts": layouts,
               "restore": restore, "moe_meshes": moe_meshes}
    extra = [Path(a) for a in sys.argv[3:]]
    result = workers[name](out_path, *extra)
    if name == "layouts":  # one result per process
        out_path = out_path.with_name(f"{out_path.stem}_{jax.process_index()}.json")
    out_path.write_text(json.dumps(result))
