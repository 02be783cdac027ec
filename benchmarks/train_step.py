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

Several configurations in one process (compiled side by side, then timed one at a time), and the
cost breakdown of the FLARE step (pieces timed separately, with their share of the step):
  python benchmarks/train_step.py --variant flare,1,full,8192 --variant causal,1,full,8192 \
      --variant flare,1,selective,8192 --variant flare,1,none,0 --breakdown \
      --breakdown-chunks 8192,32768 --compile-workers 8
``--profile DIR`` also traces two steps of each variant (``jax.profiler``, kept in DIR) and adds
its ``--profile-top`` (25) costliest kernels by device time to the row
(``benchmarks/trace_summary.py``; ``benchmarks/hlo_fusions.py`` says what an XLA fusion among them
computes).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen3_5_0p8b.py"
PEAK_FLOPS = 989e12  # dense bf16 FLOP/s of one H100 SXM; the H200 has the same


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


class Variant(NamedTuple):
    """One measured train step: objective, global batch (rows), layer remat policy
    (``layer_scan.REMAT_POLICIES``), vocabulary chunk of the cross-entropy (0: full logits),
    kernel backend, token chunk of the cross-entropy (> 0: over positions instead, see
    ``train.token_chunk``) and the dtype its logits are stored in (``train.logits_dtype``)."""

    objective: str
    batch: int
    remat: str
    vocab_chunk: int
    backend: str
    token_chunk: int = 0
    logits_dtype: str = "float32"

    def label(self) -> str:
        chunk = f"tokens {self.token_chunk}" if self.token_chunk else f"chunk {self.vocab_chunk}"
        logits = "" if self.logits_dtype == "float32" else f" {self.logits_dtype} logits"
        return f"{self.objective} b{self.batch} remat {self.remat} {chunk}{logits}"


class Setup(NamedTuple):
    """What every variant and breakdown piece of one run shares: configs, mesh, optimizer and
    the host-drawn parameters (copied for each variant, whose step donates its state)."""

    cfg: Any
    config: Any
    mesh: Any
    tx: Any
    params: Any
    abstract_state: Any  # the train state's shapes, dtypes and shardings (to trace the steps)
    scan_layers: bool


def _setup(args) -> Setup:
    from flare_jax.train.optimizer import make_optimizer

    cfg, config = _model_config(args)
    mesh = _mesh(cfg, args)
    tx, _ = make_optimizer(learning_rate=1e-5, warmup_steps=10, total_steps=1000,
                           min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                           clip_norm=1.0)
    import jax

    from flare_jax.train.step import init_state

    scan_layers = cfg.model.scan_layers if args.scan_layers is None else args.scan_layers
    params = _host_random_params(config, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            init_state(tx, params, mesh))
    return Setup(cfg, config, mesh, tx, params, abstract, scan_layers)


def _fresh_state(setup: Setup):
    import jax
    import jax.numpy as jnp

    from flare_jax.train.step import init_state

    return init_state(setup.tx, jax.tree.map(jnp.copy, setup.params), setup.mesh)


def _device_batch(setup: Setup, rows: int, seq: int) -> dict:
    from flare_jax.train.sharding import batch_sharding

    sharding = batch_sharding(setup.mesh)
    return {k: _global_array(v, sharding)
            for k, v in _batch(rows, seq, setup.config.vocab_size).items()}


def _lower_step(setup: Setup, variant: Variant, args):
    """The lowered (traced, not compiled) train step of ``variant`` and its batch."""
    from flare_jax.train import config as train_config
    from flare_jax.train.loop import COMPUTE_DTYPES
    from flare_jax.train.step import ModelBinder, StepConfig, make_train_step, state_shardings

    cfg, config = setup.cfg, setup.config
    check_batch(variant.batch, setup.mesh)
    step_cfg = StepConfig(block_size=cfg.block_size,
                          noise=train_config.noise_config(cfg, config.mask_token_id),
                          loss=train_config.loss_config(cfg), remat=variant.remat,
                          objective=variant.objective, scan_layers=setup.scan_layers,
                          vocab_chunk=variant.vocab_chunk, token_chunk=variant.token_chunk,
                          logits_dtype=variant.logits_dtype)
    step = make_train_step(ModelBinder(config, COMPUTE_DTYPES[cfg.model.dtype], variant.backend),
                           setup.tx, step_cfg, setup.mesh,
                           state_shardings(setup.tx, setup.params, setup.mesh), seed=0)
    batch = _device_batch(setup, variant.batch, args.seq)
    return step.lower(setup.abstract_state, batch), batch


def _compile(lowered):
    """``(compiled, seconds)``; called from the compile threads (tracing stays on the main
    thread: flax's graph bookkeeping is not thread-safe)."""
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def _measure_step(setup: Setup, variant: Variant, args, batch, compiled, compile_s: float
                  ) -> dict:
    import jax

    from flare_jax.train.metrics import train_flops_per_row

    state = _fresh_state(setup)
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - start
    history = [metrics]
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
        history.append(metrics)
    jax.block_until_ready(history)
    step_s = (time.perf_counter() - start) / args.steps
    profile = {}
    if args.profile is not None:
        from trace_summary import profile_top

        carried = [state]  # the step donates its state: thread it through the traced calls

        def call():
            carried[0], step_metrics = compiled(carried[0], batch)
            return step_metrics

        profile["profile_top"] = profile_top(
            call, calls=2, trace_dir=str(args.profile / variant.label().replace(" ", "_")),
            top=args.profile_top)
    devices = setup.mesh.devices.size
    flops = variant.batch * train_flops_per_row(setup.config, args.seq, setup.cfg.block_size,
                                                flare=variant.objective == "flare")
    tokens_per_s = variant.batch * args.seq / step_s
    return {"impl": f"jax-{variant.objective}", "backend": variant.backend,
            "scan_layers": setup.scan_layers, "remat": variant.remat,
            "vocab_chunk": variant.vocab_chunk, "token_chunk": variant.token_chunk,
            "logits_dtype": variant.logits_dtype,
            "mesh": dict(setup.mesh.shape),
            "processes": jax.process_count(), "devices": devices, "batch": variant.batch,
            "seq": args.seq, "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / devices,
            "model_tflops": flops / 1e12, "mfu": flops / step_s / devices / PEAK_FLOPS,
            "compile_s": compile_s, "first_step_s": first_s,
            "losses": [float(m["loss"]) for m in history], **_program_stats(compiled), **profile,
            "device": jax.devices()[0].device_kind}


def _error_row(variant: Variant, err: Exception) -> dict:
    return {"impl": f"jax-{variant.objective}", "backend": variant.backend,
            "batch": variant.batch, "remat": variant.remat, "vocab_chunk": variant.vocab_chunk,
            "token_chunk": variant.token_chunk, "logits_dtype": variant.logits_dtype,
            "error": f"{type(err).__name__}: {str(err)[:1500]}"}


def _out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


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


def _breakdown_pieces(setup: Setup, args) -> dict[str, tuple[Any, Any]]:
    """Jitted pieces of the FLARE step on its real shape (``--batch`` rows of ``--seq``), each
    with a function making its inputs (called when the piece runs, so that large inputs hold
    no device memory while the steps are timed): the embedding and all layers forward
    (final-normed hidden states out); their forward + backward under each remat policy; the
    head + FLARE loss forward + backward from the final hidden states, with full logits and
    with each ``--breakdown-chunks`` vocabulary chunk; one linear-attention and one
    full-attention layer forward + backward on the packed ``[clean ; noisy]`` row; the
    optimizer update (clipping + AdamW)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flare_jax.config import FULL
    from flare_jax.layout import FlareLayout
    from flare_jax.model.layer_scan import REMAT_POLICIES
    from flare_jax.objective import add_noise, flare_loss, head_cross_entropy
    from flare_jax.train import config as train_config
    from flare_jax.train.loop import COMPUTE_DTYPES
    from flare_jax.train.step import ModelBinder

    cfg, config, block = setup.cfg, setup.config, setup.cfg.block_size
    dtype = COMPUTE_DTYPES[cfg.model.dtype]
    binder = ModelBinder(config, dtype, args.backend)
    batch = _device_batch(setup, args.batch, args.seq)
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    noisy, noise_mask, rate = add_noise(
        jax.random.key(0), tokens, FlareLayout.from_segments(segment_ids, block),
        batch["loss_mask"], train_config.noise_config(cfg, config.mask_token_id))
    loss_cfg = train_config.loss_config(cfg)
    targets = (tokens, noise_mask, batch["loss_mask"], segment_ids, rate)

    def normal(i: int, length: int):
        shape = (args.batch, length, config.hidden_size)
        return jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype)

    def layers_fwd(params, tokens, noisy, segment_ids):
        return binder(params).flare(tokens, noisy, FlareLayout.from_segments(segment_ids, block),
                                    scan_layers=setup.scan_layers, normed_hidden=True)

    def layers_fwd_bwd(remat: str):
        def fwd_bwd(params, tokens, noisy, segment_ids, cotangent):
            def loss(p):
                out = binder(p).flare(tokens, noisy, FlareLayout.from_segments(segment_ids, block),
                                      remat=remat, scan_layers=setup.scan_layers,
                                      normed_hidden=True)
                return _dot(jnp.concatenate(out, axis=1), cotangent)
            return jax.grad(loss)(params)
        return fwd_bwd

    model = binder(setup.params)
    weight, vocab_major = model.head_weight()

    def head_loss(chunk: str):
        vocab_chunk, token_chunk, logits_dtype = _head_chunks(chunk)

        def fwd_bwd(weight, clean, noisy, *targets):
            def loss(w, c, n):
                if vocab_chunk or token_chunk:
                    head = head_cross_entropy(w, vocab_major, vocab_chunk=vocab_chunk,
                                              token_chunk=token_chunk, logits_dtype=logits_dtype)
                    return flare_loss(c, n, *targets, loss_cfg, head)[0]
                head = (w.T if vocab_major else w).astype(dtype)
                logits = [jnp.einsum("bli,iv->blv", x, head, preferred_element_type=jnp.float32)
                          for x in (c, n)]
                return flare_loss(*logits, *targets, loss_cfg)[0]
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(weight, clean, noisy)
        return fwd_bwd

    def layer_fwd_bwd(index: int):
        graphdef, state = nnx.split(model.layers[index])

        def fwd_bwd(state, h, segment_ids, cotangent):
            def loss(s, x):
                layout = FlareLayout.from_segments(segment_ids, block)
                return _dot(nnx.merge(graphdef, s).flare(x, layout)[0], cotangent)
            return jax.grad(loss, argnums=(0, 1))(state, h)
        return fwd_bwd, state

    def optimizer_update(grads, opt_state, params):
        updates, opt_state = setup.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    row_in = (setup.params, tokens, noisy, segment_ids)
    packed, cotangent = normal(1, 2 * args.seq), normal(2, 2 * args.seq)
    hidden = (weight, normal(3, args.seq), normal(4, args.seq), *targets)
    pieces = {"layers_fwd": (layers_fwd, row_in)}
    for remat in REMAT_POLICIES:
        pieces[f"layers_fwd_bwd_remat_{remat}"] = (layers_fwd_bwd(remat), (*row_in, cotangent))
    for chunk in ("0", *args.breakdown_chunks):
        pieces[f"head_loss_fwd_bwd_chunk_{chunk}"] = (head_loss(chunk), hidden)
    for kind, index in (("linear", config.layer_types.index("linear_attention")),
                        ("full", config.layer_types.index(FULL))):
        fn, state = layer_fwd_bwd(index)
        pieces[f"{kind}_layer_fwd_bwd"] = (fn, (state, packed, segment_ids, cotangent))
    pieces["optimizer_update"] = (optimizer_update, lambda: (
        setup.params, jax.jit(setup.tx.init)(setup.params), setup.params))
    return {name: (jax.jit(fn), inputs if callable(inputs) else (lambda inputs=inputs: inputs))
            for name, (fn, inputs) in pieces.items()}


def _dot(out, cotangent):
    """A scalar whose gradient feeds ``cotangent`` into ``out`` (a backward pass's input)."""
    import jax.numpy as jnp

    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))


def _time_compiled(compiled, inputs: tuple, reps: int) -> float:
    """Mean ms of ``reps`` calls after a warm-up call."""
    import jax

    jax.block_until_ready(compiled(*inputs))
    start = time.perf_counter()
    outs = [compiled(*inputs) for _ in range(reps)]
    jax.block_until_ready(outs)
    return 1e3 * (time.perf_counter() - start) / reps


def _run_breakdown(args, setup: Setup, rows: list[dict], compiled: dict, pieces: dict) -> dict:
    """Times of the breakdown pieces and their share of the FLARE step of the same batch (the
    first such row measured), with the layer-count estimate of the layer stack."""
    from flare_jax.config import FULL

    ms, errors = {}, {}
    for name, future in compiled.items():
        try:
            ms[name] = _time_compiled(future.result()[0], pieces[name][1](), args.steps)
        except Exception as err:  # noqa: BLE001 (out of memory: record, go on)
            errors[name] = f"{type(err).__name__}: {str(err)[:600]}"
    n_full = setup.config.layer_types.count(FULL)
    n_linear = len(setup.config.layer_types) - n_full
    if "linear_layer_fwd_bwd" in ms and "full_layer_fwd_bwd" in ms:
        ms["layers_fwd_bwd_from_single_layers"] = (n_linear * ms["linear_layer_fwd_bwd"]
                                                   + n_full * ms["full_layer_fwd_bwd"])
    step = next((r for r in rows if r.get("impl") == "jax-flare" and r.get("batch") == args.batch
                 and "step_ms" in r), None)
    row = {"breakdown": "jax-flare", "batch": args.batch, "seq": args.seq,
           "layers": {"linear": n_linear, "full": n_full}, "ms": ms, "errors": errors}
    if step is not None:
        row["reference_step"] = {k: step[k] for k in ("remat", "vocab_chunk", "token_chunk",
                                                       "step_ms")}
        row["share_of_step"] = {name: t / step["step_ms"] for name, t in ms.items()}
    return row


def _variants(args) -> list[Variant]:
    """``--variant`` entries, else ``--objective`` x ``--batch`` x ``--remat`` x
    ``--vocab-chunk`` (defaults from the config)."""
    if args.variant:
        return args.variant
    from flare_jax.train import apply_overrides, load_config_file

    cfg = load_config_file(args.config)
    apply_overrides(cfg, args.override)
    remat = cfg.model.remat if args.remat is None else REMAT_SPELLINGS[args.remat]
    chunk = cfg.train.vocab_chunk if args.vocab_chunk is None else args.vocab_chunk
    objectives = ("flare", "causal") if args.objective == "both" else (args.objective,)
    return [Variant(o, args.batch, remat, chunk, args.backend, cfg.train.token_chunk,
                    cfg.train.logits_dtype) for o in objectives]


def _ratio_rows(rows: list[dict]) -> list[dict]:
    """FLARE over causal step time for every measured pair of the same batch, remat, chunk."""
    def key(row):
        return (row["batch"], row["remat"], row["vocab_chunk"], row["token_chunk"],
                row["logits_dtype"])

    causal = {key(r): r for r in rows if r.get("impl") == "jax-causal" and "step_ms" in r}
    return [{"batch": r["batch"], "remat": r["remat"], "vocab_chunk": r["vocab_chunk"],
             "token_chunk": r["token_chunk"], "logits_dtype": r["logits_dtype"],
             "flare_over_causal_step_time": r["step_ms"] / causal[key(r)]["step_ms"]}
            for r in rows if r.get("impl") == "jax-flare" and "step_ms" in r and key(r) in causal]


class Recorder:
    """Prints each row as it comes and rewrites ``--out`` after each (a run cut short keeps
    what it measured)."""

    def __init__(self, out: Path | None):
        self.out, self.rows = out, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        _print(row)
        if self.out is not None and _is_main():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.rows, indent=2) + "\n")


def _reference(variant: Variant) -> Variant | None:
    """The variant on the reference kernels, to fall back to (None if it is one already)."""
    return None if variant.backend == "reference" else variant._replace(backend="reference")


def _submit_lowered(pool, fn, make_inputs) -> Future:
    """``fn`` traced here on the shapes of ``make_inputs()`` and compiled on ``pool``; a
    tracing error is returned in the future."""
    import jax

    try:
        return pool.submit(_compile, fn.lower(*jax.eval_shape(make_inputs)))
    except Exception as err:  # noqa: BLE001 (recorded in the breakdown row)
        failed = Future()
        failed.set_exception(err)
        return failed


def run_jax(args, recorder: Recorder) -> None:
    """Trace every variant (and the breakdown pieces) on this thread, compiling each on
    ``--compile-workers`` threads as soon as it is traced (XLA compiles release the GIL), then,
    once every compile is done, time them one after the other on the idle device. A variant
    that fails other than by running out of memory is recorded and measured again on the
    reference kernels."""
    from concurrent.futures import ThreadPoolExecutor, wait

    setup = _setup(args)
    with ThreadPoolExecutor(args.compile_workers) as pool:
        steps, queue = {}, _variants(args)
        while queue:
            variant = queue.pop(0)
            try:
                lowered, batch = _lower_step(setup, variant, args)
                steps[variant] = batch, pool.submit(_compile, lowered)
            except Exception as err:  # noqa: BLE001 (kernels in progress)
                recorder.add(_error_row(variant, err))
                queue[:0] = [v for v in [_reference(variant)] if v is not None]
        pieces = _breakdown_pieces(setup, args) if args.breakdown else {}
        compiled_pieces = {name: _submit_lowered(pool, fn, inputs)
                           for name, (fn, inputs) in pieces.items()}
        wait([future for _, future in steps.values()] + list(compiled_pieces.values()))
    for variant, (batch, future) in steps.items():
        try:
            row = _measure_step(setup, variant, args, batch, *future.result())
        except Exception as err:  # noqa: BLE001 (out of memory, kernels in progress)
            row = _error_row(variant, err)
            if future.exception() is None:  # compiled: what XLA planned for it
                row.update(_program_stats(future.result()[0]))
            fallback = None if _out_of_memory(err) else _reference(variant)
            if fallback is not None:
                recorder.add(row)
                lowered, batch = _lower_step(setup, fallback, args)
                row = _measure_step(setup, fallback, args, batch, *_compile(lowered))
        recorder.add(row)
    if pieces:
        recorder.add(_run_breakdown(args, setup, recorder.rows, compiled_pieces, pieces))
    for row in _ratio_rows(recorder.rows):
        recorder.add(row)


def run_hf(args) -> dict:
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
    return {"impl": "hf-torch-causal", "batch": args.batch, "seq": args.seq,
           "step_ms": 1e3 * step_s, "tokens_per_s": args.batch * args.seq / step_s,
           "mfu": flops / step_s / PEAK_FLOPS, "first_step_s": first, "loss": float(loss),
           "fla_available": import_utils.is_flash_linear_attention_available(),
           "device": torch.cuda.get_device_name()}


def _mesh_flag(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(v) for v in text.split(","))
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"--mesh wants data,fsdp,tensor, got {text!r}")
    return sizes


# --remat / --variant spellings: the policies, and the earlier on/off words of the recorded
# commands in docs/performance.md ("remat" was the "full" policy).
REMAT_SPELLINGS = {"none": "none", "full": "full", "selective": "selective",
                   "selective_inputs": "selective_inputs",
                   "remat": "full", "no-remat": "none"}
_VARIANT_FORM = (f"objective,batch,{'|'.join(REMAT_SPELLINGS)},vocab_chunk|tTOKENS[-bf16]"
                 "[,backend]")


def _head_chunks(text: str) -> tuple[int, int, str]:
    """``(vocab_chunk, token_chunk, logits_dtype)`` of a chunk field: ``8192`` a vocabulary
    chunk (``0``: full logits), ``t4096`` a token chunk (``train.token_chunk``) with fp32
    logits, ``t4096-bf16`` with bf16 logits (``train.logits_dtype``)."""
    if not text.startswith("t"):
        return int(text), 0, "float32"
    tokens, _, dtype = text[1:].partition("-")
    if dtype not in ("", "bf16"):
        raise argparse.ArgumentTypeError(f"--variant: logits suffix wants -bf16, got {text!r}")
    return 0, int(tokens), "bfloat16" if dtype else "float32"


def _variant_flag(text: str) -> Variant:
    """``objective,batch,remat,chunk[,backend]`` (remat: ``REMAT_SPELLINGS``; chunk: see
    ``_head_chunks``)."""
    parts = text.split(",")
    if len(parts) not in (4, 5) or parts[2] not in REMAT_SPELLINGS:
        raise argparse.ArgumentTypeError(f"--variant wants {_VARIANT_FORM}, got {text!r}")
    vocab_chunk, token_chunk, logits_dtype = _head_chunks(parts[3])
    return Variant(parts[0], int(parts[1]), REMAT_SPELLINGS[parts[2]], vocab_chunk,
                   parts[4] if len(parts) == 5 else "auto", token_chunk, logits_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["hf"], default=None)
    parser.add_argument("--objective", choices=["flare", "causal", "both"], default="both")
    parser.add_argument("--batch", type=int, default=1, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--remat", choices=REMAT_SPELLINGS, default=None,
                        help="what each layer keeps for the backward pass (default: model.remat)")
    parser.add_argument("--vocab-chunk", type=int, default=None,
                        help="cross-entropy vocabulary chunk, 0: full logits (default: "
                             "train.vocab_chunk)")
    parser.add_argument("--variant", type=_variant_flag, action="append", default=[],
                        help=f"{_VARIANT_FORM} (repeatable; "
                             "replaces --objective/--batch/--remat/--vocab-chunk/--backend)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time pieces of the FLARE step at --batch (see "
                             "_breakdown_pieces) and their share of that step")
    parser.add_argument("--breakdown-chunks", type=lambda t: t.split(","),
                        default=[8192], help="vocabulary chunks of the breakdown's head pieces")
    parser.add_argument("--compile-workers", type=int, default=1,
                        help="threads compiling the variants and pieces")
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
    parser.add_argument("--profile", type=Path, default=None,
                        help="after timing each variant, trace 2 more steps into this folder and "
                             "add the top kernels by device time to its row (profile_top)")
    parser.add_argument("--profile-top", type=int, default=25,
                        help="how many kernels --profile lists (with their share of device time)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the rows as JSON (process 0), rewritten after each row")
    args = parser.parse_args()
    if args.peer != "hf":
        from flare_jax.train.memory import default_memory_fraction

        default_memory_fraction()  # as `flare train` does: XLA's 75% does not fit batch 4 on 80 GB
    if args.distributed:
        from flare_jax.train.mesh import initialize_distributed

        initialize_distributed()
    recorder = Recorder(args.out)
    if args.peer == "hf":
        recorder.add(run_hf(args))
    else:
        run_jax(args, recorder)


if __name__ == "__main__":
    main()
