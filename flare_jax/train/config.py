"""The training config schema (ml_collections) and its validation.

``default_config()`` lists every field with its default; config files under ``configs/`` start from
it and override. ``validate(cfg)`` checks every field and raises :class:`TrainConfigError` naming
the offending field (``config.optimizer.learning_rate: ...``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from flare_jax.checkpoint import HF_CONFIG_FILE
from flare_jax.config import ConfigError, ModelConfig
from flare_jax.data import DataConfig
from flare_jax.model.layer_scan import REMAT_POLICIES
from flare_jax.objective import LossConfig, NoiseConfig

DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "reference", "gpu", "tpu")
OBJECTIVES = ("flare", "causal")


class TrainConfigError(ValueError):
    """A training config field holds an unusable value; the message names the field."""


def default_config() -> ml_collections.ConfigDict:
    """Every field of the training config with its default value."""
    c = ml_collections.ConfigDict()
    c.workdir = ""
    c.seed = 0
    c.block_size = 32

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # a flare-jax checkpoint dir; empty: random init from model.hf_config
    c.model.hf_config = ml_collections.ConfigDict()  # HF text-config fields (model_type optional)
    c.model.mask_token_id = -1  # -1: take it from the model config
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay fp32
    c.model.backend = "auto"
    # what each decoder layer keeps for the backward pass: "none" (all activations), "full"
    # (its input; everything recomputed), "selective" (also matmul, op and kernel outputs;
    # only elementwise work recomputed), "selective_inputs" (also every projection's input):
    # flare_jax.model.layer_scan
    c.model.remat = "none"
    c.model.scan_layers = True  # run repeated layer groups in one lax.scan: the compiled program
    # holds one group instead of every layer (same numbers; stacks that do not repeat run unrolled)

    c.data = ml_collections.ConfigDict()
    c.data.paths = ()
    c.data.tokenizer_dir = ""  # empty: the init_from checkpoint dir
    c.data.seq_len = 512
    c.data.global_batch_size = 8
    c.data.seed = 0
    c.data.shuffle = True
    c.data.read_threads = 0
    c.data.prefetch = 0

    c.noise = ml_collections.ConfigDict()
    c.noise.eps = 1e-3
    c.noise.per = "block"
    c.noise.position_dependent = False

    c.loss = ml_collections.ConfigDict()
    c.loss.ar_weight = 1.0
    c.loss.diffusion_weight = 1.0
    c.loss.logit_shift = False
    c.loss.elbo_weighting = False
    # Weight of the MoE router load-balancing loss (dense models: no effect). None: the model's
    # HF `router_aux_loss_coef` (model.hf_config, or the hf_config.json that conversion keeps in
    # the model.init_from checkpoint) when it has one, else HF's default 0.001.
    c.loss.router_aux_weight = None

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: every device left over
    c.mesh.tensor = 1
    c.mesh.expert = 1  # expert parallelism: the MoE experts (and the batch) split over this axis

    c.train = ml_collections.ConfigDict()
    c.train.objective = "flare"  # or "causal": plain next-token training of the clean rows
    c.train.steps = 1000
    c.train.grad_accum = 1
    c.train.log_every = 10
    c.train.progress = True
    c.train.peak_tflops = 0.0  # per device; 0: known value for the device kind, else no MFU
    # cross-entropy over vocabulary chunks of this many tokens, never holding the [B, L, V] fp32
    # logits and their gradient (flare_jax/vocab_ce.py); 0: from full logits
    c.train.vocab_chunk = 8192
    # > 0: instead of vocab_chunk, over steps of about this many tokens with the whole vocabulary,
    # the gradients formed in the forward pass (flare_jax/token_ce.py: 3 head matmuls, not 4)
    c.train.token_chunk = 0
    # with token_chunk: what the head matmul stores, "float32" or "bfloat16" (fp32 accumulation and
    # an fp32 softmax either way; bf16 halves the bytes of the two passes over the logits)
    c.train.logits_dtype = "float32"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export = True  # write workdir/export as a flare-jax checkpoint at the end
    return c


def _check(cfg: ml_collections.ConfigDict, field: str, ok: Callable[[Any], bool],
           expected: str) -> None:
    value = cfg
    for key in field.split("."):
        if key not in value:
            raise TrainConfigError(f"config.{field}: missing")
        value = value[key]
    if not ok(value):
        raise TrainConfigError(f"config.{field}: expected {expected}, got {value!r}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise :class:`TrainConfigError` naming the first invalid field."""
    unknown = sorted(set(cfg.keys()) - set(default_config().keys()))
    if unknown:
        raise TrainConfigError(f"config.{unknown[0]}: unknown field")
    for section, defaults in default_config().items():
        if isinstance(defaults, ml_collections.ConfigDict):
            extra = sorted(set(cfg[section].keys()) - set(defaults.keys()))
            if extra:
                raise TrainConfigError(f"config.{section}.{extra[0]}: unknown field")
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("workdir", lambda v: isinstance(v, str) and v != "", "a non-empty directory path"),
        ("seed", lambda v: _int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
        ("block_size", lambda v: _int(v) and v >= 1, "a positive int"),
        ("model.init_from", lambda v: isinstance(v, str), "a path string"),
        ("model.mask_token_id", lambda v: _int(v) and v >= -1, "an int >= -1"),
        ("model.dtype", lambda v: v in DTYPES, f"one of {DTYPES}"),
        ("model.backend", lambda v: v in BACKENDS, f"one of {BACKENDS}"),
        ("model.remat", lambda v: v in REMAT_POLICIES, f"one of {REMAT_POLICIES}"),
        ("model.scan_layers", lambda v: isinstance(v, bool), "a bool"),
        ("data.paths", lambda v: isinstance(v, list | tuple) and len(v) > 0
         and all(isinstance(p, str) for p in v), "a non-empty list of file paths/globs"),
        ("data.tokenizer_dir", lambda v: isinstance(v, str), "a path string"),
        ("data.seq_len", lambda v: _int(v) and v >= 2, "an int >= 2"),
        ("data.global_batch_size", lambda v: _int(v) and v >= 1, "a positive int"),
        ("data.seed", lambda v: _int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
        ("data.shuffle", lambda v: isinstance(v, bool), "a bool"),
        ("data.read_threads", lambda v: _int(v) and v >= 0, "an int >= 0"),
        ("data.prefetch", lambda v: _int(v) and v >= 0, "an int >= 0"),
        ("noise.eps", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("noise.per", lambda v: v in ("block", "sequence"), "'block' or 'sequence'"),
        ("noise.position_dependent", lambda v: isinstance(v, bool), "a bool"),
        ("loss.ar_weight", lambda v: _num(v) and v >= 0, "a number >= 0"),
        ("loss.diffusion_weight", lambda v: _num(v) and v >= 0, "a number >= 0"),
        ("loss.logit_shift", lambda v: isinstance(v, bool), "a bool"),
        ("loss.elbo_weighting", lambda v: isinstance(v, bool), "a bool"),
        ("loss.router_aux_weight", lambda v: v is None or (_num(v) and v >= 0),
         "None or a number >= 0"),
        ("optimizer.learning_rate", lambda v: _num(v) and v > 0, "a number > 0"),
        ("optimizer.warmup_steps", lambda v: _int(v) and v >= 0, "an int >= 0"),
        ("optimizer.min_lr_ratio", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        ("optimizer.weight_decay", lambda v: _num(v) and v >= 0, "a number >= 0"),
        ("optimizer.b1", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("optimizer.b2", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("optimizer.eps", lambda v: _num(v) and v > 0, "a number > 0"),
        ("optimizer.clip_norm", lambda v: _num(v) and v >= 0, "a number >= 0 (0: no clipping)"),
        ("mesh.data", lambda v: _int(v) and (v >= 1 or v == -1), "a positive int or -1"),
        ("mesh.fsdp", lambda v: _int(v) and (v >= 1 or v == -1), "a positive int or -1"),
        ("mesh.tensor", lambda v: _int(v) and (v >= 1 or v == -1), "a positive int or -1"),
        ("mesh.expert", lambda v: _int(v) and (v >= 1 or v == -1), "a positive int or -1"),
        ("train.objective", lambda v: v in OBJECTIVES, f"one of {OBJECTIVES}"),
        ("train.steps", lambda v: _int(v) and v >= 1, "a positive int"),
        ("train.grad_accum", lambda v: _int(v) and v >= 1, "a positive int"),
        ("train.log_every", lambda v: _int(v) and v >= 1, "a positive int"),
        ("train.progress", lambda v: isinstance(v, bool), "a bool"),
        ("train.peak_tflops", lambda v: _num(v) and v >= 0, "a number >= 0"),
        ("train.vocab_chunk", lambda v: _int(v) and v >= 0, "an int >= 0 (0: full logits)"),
        ("train.token_chunk", lambda v: _int(v) and v >= 0, "an int >= 0 (0: off)"),
        ("train.logits_dtype", lambda v: v in DTYPES, f"one of {DTYPES}"),
        ("checkpoint.every", lambda v: _int(v) and v >= 0, "an int >= 0 (0: only at the end)"),
        ("checkpoint.keep", lambda v: _int(v) and v >= 1, "a positive int"),
        ("checkpoint.async_save", lambda v: isinstance(v, bool), "a bool"),
        ("checkpoint.export", lambda v: isinstance(v, bool), "a bool"),
    ]
    for field, ok, expected in checks:
        _check(cfg, field, ok, expected)
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor].count(-1) > 1:
        raise TrainConfigError("config.mesh: at most one of data/fsdp/expert/tensor may be -1")
    if cfg.loss.ar_weight == 0 and cfg.loss.diffusion_weight == 0:
        raise TrainConfigError("config.loss.diffusion_weight: ar_weight and diffusion_weight are "
                               "both 0, nothing would be trained")
    if cfg.loss.elbo_weighting and cfg.noise.eps == 0:
        raise TrainConfigError("config.noise.eps: must be > 0 with loss.elbo_weighting (1/t)")
    if cfg.train.logits_dtype != "float32" and cfg.train.token_chunk == 0:
        raise TrainConfigError("config.train.logits_dtype: bfloat16 logits need train.token_chunk "
                               "> 0 (the vocabulary-chunked cross-entropy keeps fp32 logits)")
    if cfg.data.global_batch_size % cfg.train.grad_accum:
        raise TrainConfigError(f"config.train.grad_accum: {cfg.train.grad_accum} does not divide "
                               f"data.global_batch_size={cfg.data.global_batch_size}")
    if not cfg.model.init_from and not cfg.model.hf_config:
        raise TrainConfigError("config.model.hf_config: needed when model.init_from is empty "
                               "(random init)")
    if not cfg.model.init_from and not cfg.data.tokenizer_dir:
        raise TrainConfigError("config.data.tokenizer_dir: needed when model.init_from is empty")


def model_config_from(cfg: ml_collections.ConfigDict, base: ModelConfig | None) -> ModelConfig:
    """The model config: ``base`` (from ``init_from``) or ``model.hf_config``, with
    ``model.mask_token_id`` applied; the mask token must be set for training."""
    if base is None:
        fields = {"model_type": "qwen3_5_text", **cfg.model.hf_config.to_dict()}
        try:
            base = ModelConfig.from_hf_dict(fields, source="config.model.hf_config")
        except ConfigError as err:
            raise TrainConfigError(str(err)) from None
    if cfg.model.mask_token_id >= 0:
        if cfg.model.mask_token_id >= base.vocab_size:
            raise TrainConfigError(f"config.model.mask_token_id: {cfg.model.mask_token_id} is "
                                   f"outside the vocabulary [0, {base.vocab_size})")
        base = ModelConfig.from_dict({**base.to_dict(), "mask_token_id": cfg.model.mask_token_id})
    if base.mask_token_id is None:
        raise TrainConfigError("config.model.mask_token_id: the model config has no mask token; "
                               "set one")
    return base


def noise_config(cfg: ml_collections.ConfigDict, mask_token_id: int) -> NoiseConfig:
    """The objective's noise settings."""
    return NoiseConfig(mask_token_id=mask_token_id, eps=float(cfg.noise.eps), per=cfg.noise.per,
                       position_dependent=cfg.noise.position_dependent)


def _hf_router_aux_weight(cfg: ml_collections.ConfigDict) -> float | None:
    """``router_aux_loss_coef`` of the model's HF config (``model.hf_config``, else the
    ``hf_config.json`` of ``model.init_from``; a nested ``text_config`` counts), if any."""
    hf = cfg.model.hf_config.to_dict()
    path = Path(cfg.model.init_from) / HF_CONFIG_FILE if cfg.model.init_from else None
    if path is not None and path.is_file():
        hf = json.loads(path.read_text())
    for fields in (hf, hf.get("text_config") or {}):
        if fields.get("router_aux_loss_coef") is not None:
            return float(fields["router_aux_loss_coef"])
    return None


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    """The objective's loss balance; an unset ``loss.router_aux_weight`` comes from the model's
    HF config (HF's default 0.001 if it has none)."""
    router = cfg.loss.router_aux_weight
    if router is None:
        router = _hf_router_aux_weight(cfg)
    weight = {} if router is None else {"router_aux_weight": float(router)}
    return LossConfig(ar_weight=float(cfg.loss.ar_weight),
                      diffusion_weight=float(cfg.loss.diffusion_weight),
                      logit_shift=cfg.loss.logit_shift, elbo_weighting=cfg.loss.elbo_weighting,
                      **weight)


def data_config(cfg: ml_collections.ConfigDict, data_slices: int, pad_id: int) -> DataConfig:
    """This process's data settings: the global batch split evenly into ``data_slices`` (the
    groups of processes holding different rows, see ``sharding.process_batch_slice``)."""
    if cfg.data.global_batch_size % data_slices:
        raise TrainConfigError(f"config.data.global_batch_size: {cfg.data.global_batch_size} is "
                               f"not divisible by the {data_slices} process groups holding "
                               "different batch rows")
    return DataConfig(paths=tuple(cfg.data.paths), seq_len=cfg.data.seq_len,
                      batch_size=cfg.data.global_batch_size // data_slices, seed=cfg.data.seed,
                      shuffle=cfg.data.shuffle, pad_id=pad_id, read_threads=cfg.data.read_threads,
                      prefetch=cfg.data.prefetch)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Run ``get_config()`` of a Python config file (``configs/<name>.py``); the file may import
    helper modules that sit in its directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"flare_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.absolute()))  # helpers next to the config file
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, "get_config"):
        raise TrainConfigError(f"{path}: defines no get_config()")
    return module.get_config()


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``config.a.b=value`` (or ``--config.a.b=value``) overrides in place; values are
    Python literals converted to the field's type (strings may be bare)."""
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        if not sep or not key.startswith("config."):
            raise TrainConfigError(f"override {item!r}: expected --config.<field>=<value>")
        path = key.removeprefix("config.").split(".")
        node = cfg
        for part in path[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise TrainConfigError(f"{key}: unknown field")
            node = node[part]
        if path[-1] not in node:
            raise TrainConfigError(f"{key}: unknown field")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        current = node[path[-1]]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list | str):
            value = tuple(value) if isinstance(value, list) else (value,)
        if isinstance(current, str) and not isinstance(value, str):
            value = text
        if current is not None and type(value) is not type(current):
            raise TrainConfigError(f"{key}: expected a {type(current).__name__}, got {text!r}")
        node[path[-1]] = value
