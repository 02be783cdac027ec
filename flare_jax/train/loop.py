"""The training loop: config -> mesh, model, data, optimizer -> resume or init -> steps with
metrics and periodic checkpoints -> export of the final parameters as a flare-jax checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from flare_jax.checkpoint import (
    HF_CONFIG_FILE,
    PARAMS_DIR,
    Nested,
    as_numpy_tree,
    atomic_directory,
    copy_tokenizer_files,
    load_params,
    read_model_config,
    save_params,
    write_model_config,
)
from flare_jax.config import ModelConfig
from flare_jax.data import DocumentTokenizer, build_dataset
from flare_jax.train import config as train_config
from flare_jax.train.checkpointing import Checkpointer, abstract_like
from flare_jax.train.init import init_params
from flare_jax.train.mesh import make_mesh
from flare_jax.train.metrics import MetricsLogger, peak_flops, train_flops_per_row
from flare_jax.train.optimizer import make_optimizer
from flare_jax.train.sharding import (
    batch_divisor,
    global_batch,
    param_shardings,
    process_batch_slice,
)
from flare_jax.train.step import (
    ModelBinder,
    StepConfig,
    TrainState,
    abstract_params,
    init_state,
    make_train_step,
    state_shardings,
)

log = logging.getLogger(__name__)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXPORT_DIR = "export"
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainResult:
    """What a run leaves: the final state, the metric rows it logged, the exported checkpoint."""

    state: TrainState
    history: list[dict[str, Any]]
    export_dir: Path | None


def _initial_params(cfg: ml_collections.ConfigDict, config: ModelConfig, mesh) -> Nested:
    if not cfg.model.init_from:
        return init_params(config, cfg.seed, mesh)
    abstract = abstract_params(config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=s),
                          abstract, param_shardings(abstract, mesh))
    return load_params(Path(cfg.model.init_from) / PARAMS_DIR, target)


def export_checkpoint(directory: Path, config: ModelConfig, params: Nested,
                      source_dir: Path | None, tokenizer_dir: Path | None) -> Path:
    """Write ``params`` as a flare-jax checkpoint dir (params, config, HF config, tokenizer)."""
    hf_config = None
    if source_dir is not None and (source_dir / HF_CONFIG_FILE).is_file():
        hf_config = json.loads((source_dir / HF_CONFIG_FILE).read_text())

    def write_metadata(target: Path) -> None:
        write_model_config(target, config, hf_config)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, target)

    if jax.process_count() == 1:
        with atomic_directory(directory, overwrite=True) as tmp:
            save_params(tmp / PARAMS_DIR, as_numpy_tree(params))
            write_metadata(tmp)
        return directory
    save_params(directory / PARAMS_DIR, params)  # every process writes its shards
    if jax.process_index() == 0:
        write_metadata(directory)
    multihost_utils.sync_global_devices("flare_export")
    return directory


def train(cfg: ml_collections.ConfigDict, stop_after: int | None = None) -> TrainResult:
    """Run (or resume from the newest checkpoint in ``workdir``) the training described by
    ``cfg`` (see :mod:`flare_jax.train.config`). ``stop_after`` ends this call after that many
    steps with a checkpoint (a job with a time limit), as does SIGTERM to a process of a
    ``jax.distributed`` run (all processes stop at the same step); the final export happens only
    once ``train.steps`` is reached."""
    train_config.validate(cfg)
    workdir = Path(cfg.workdir)
    init_from = Path(cfg.model.init_from) if cfg.model.init_from else None
    model_config = train_config.model_config_from(
        cfg, read_model_config(init_from) if init_from else None)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    shards = batch_divisor(mesh)
    if cfg.data.global_batch_size % (shards * cfg.train.grad_accum):
        raise train_config.TrainConfigError(
            f"config.data.global_batch_size: {cfg.data.global_batch_size} must be a multiple of "
            f"the batch shards ({shards} = mesh data x fsdp x expert) times train.grad_accum "
            f"({cfg.train.grad_accum})")

    tokenizer_dir = Path(cfg.data.tokenizer_dir) if cfg.data.tokenizer_dir else init_from
    tokenize = DocumentTokenizer.from_dir(str(tokenizer_dir))
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    # processes that hold the same batch rows (e.g. a tensor axis across them) read the same data
    data_slice, data_slices = process_batch_slice(mesh)
    dataset = build_dataset(train_config.data_config(cfg, data_slices, pad_id), tokenize,
                            process_index=data_slice, process_count=data_slices)
    iterator = iter(dataset)

    o = cfg.optimizer
    tx, schedule = make_optimizer(
        learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps,
        min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        clip_norm=o.clip_norm)
    abstract = abstract_params(model_config)
    shardings = state_shardings(tx, abstract, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract,
                                    jax.eval_shape(tx.init, abstract))
        state = checkpointer.restore(latest, abstract_like(abstract_state, shardings), iterator)
        log.info("resumed from step %d", latest)
    else:
        state = init_state(tx, _initial_params(cfg, model_config, mesh), mesh)

    step_cfg = StepConfig(
        block_size=cfg.block_size,
        noise=train_config.noise_config(cfg, model_config.mask_token_id),
        loss=train_config.loss_config(cfg), grad_accum=cfg.train.grad_accum,
        remat=cfg.model.remat, objective=cfg.train.objective, scan_layers=cfg.model.scan_layers,
        vocab_chunk=cfg.train.vocab_chunk, token_chunk=cfg.train.token_chunk,
        logits_dtype=cfg.train.logits_dtype)
    binder = ModelBinder(model_config, COMPUTE_DTYPES[cfg.model.dtype], cfg.model.backend)
    step_fn = make_train_step(binder, tx, step_cfg, mesh, shardings, cfg.seed)

    start = int(state.step)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    rows = cfg.data.global_batch_size
    logger = MetricsLogger(
        workdir / METRICS_FILE, total_steps=cfg.train.steps, start_step=start,
        flops_per_step=rows * train_flops_per_row(model_config, cfg.data.seq_len, cfg.block_size,
                                                  flare=cfg.train.objective == "flare"),
        tokens_per_step=rows * cfg.data.seq_len,
        peak=peak_flops(jax.devices()[0], cfg.train.peak_tflops), progress=cfg.train.progress)
    history = []
    try:
        for step in range(start, end):
            state, metrics = step_fn(state, global_batch(next(iterator), mesh))
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                history.append(logger.record(done, jax.device_get(metrics), schedule(step)))
            every = cfg.checkpoint.every
            preempted = checkpointer.reached_preemption(done)
            if (every and done % every == 0) or done == end or preempted:
                checkpointer.save(done, state, iterator.get_state())
            if preempted:
                log.warning("preemption signal: stopped after the checkpoint of step %d", done)
                end = done
                break
    finally:
        logger.close()
        checkpointer.close()

    export_dir = None
    if cfg.checkpoint.export and end == cfg.train.steps:
        export_dir = export_checkpoint(workdir / EXPORT_DIR, model_config, state.params,
                                       init_from, tokenizer_dir)
    return TrainResult(state, history, export_dir)
