"""`flare demo`: the main job end to end on an embedded default, with no downloads.

1. A generated digit task (``task.py``) as chat jsonl.
2. A seed: a small Qwen3.5-style HF checkpoint (random init, character tokenizer, the task's chat
   template), converted to flare-jax, trained autoregressively on the task, exported back to HF.
3. The user's path: convert the seed HF checkpoint, self-distill transfer data from it (its own
   answers to the training prompts), run FLARE conversion training on that.
4. Evaluation: exact match and tokens per forward of the seed (AR) and the converted model (AR,
   verified, diffusion at two thresholds), held-out AR loss of both; a table, ``results.json`` and
   a plot of the training losses.
5. With ``ablation``: the same conversion on mismatched transfer data, for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections

from flare_jax.config import FULL, LINEAR, ModelConfig
from flare_jax.convert.hf_to_jax import convert_hf
from flare_jax.convert.jax_to_hf import export_hf
from flare_jax.convert.synthetic import SPECIAL_TOKENS, write_char_tokenizer, write_random_checkpoint
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.data.tools.distill import GenerationSettings, self_distill
from flare_jax.demo.evaluate import decoding_modes, evaluate_checkpoint
from flare_jax.demo.report import ResultRow, plot_losses, print_table
from flare_jax.demo.settings import DemoSettings
from flare_jax.demo.task import (
    ALPHABET,
    CHAT_TEMPLATE,
    SORT,
    TaskFiles,
    write_relabelled,
    write_task_files,
)
from flare_jax.sampling import Sampler
from flare_jax.train import TrainResult, default_config, train

MISMATCHED_TASK = SORT
DISTILL_BATCH = 256


def seed_config(settings: DemoSettings) -> ModelConfig:
    """The seed model: 4 layers (3 Gated DeltaNet + 1 gated attention), character vocabulary."""
    h = settings.hidden_size
    return ModelConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET), hidden_size=h, intermediate_size=2 * h,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=h // 4,
        linear_value_head_dim=h // 4, linear_conv_kernel_dim=4,
        layer_types=(LINEAR, LINEAR, LINEAR, FULL), tie_word_embeddings=True, eos_token_id=(1,),
        pad_token_id=0, mask_token_id=SPECIAL_TOKENS.index("<mask>"), max_position_embeddings=512)


def train_config(settings: DemoSettings, workdir: Path, init_from: Path, data: Path,
                 objective: str, steps: int) -> ml_collections.ConfigDict:
    """One training run of the demo (fp32 on CPU, a single device)."""
    c = default_config()
    c.workdir = str(workdir)
    c.seed = settings.seed
    c.block_size = settings.block_size
    c.model.init_from = str(init_from)
    c.model.dtype = "float32"
    c.model.mask_token_id = SPECIAL_TOKENS.index("<mask>")  # HF configs carry no mask token
    c.data.paths = (str(data),)
    c.data.seq_len = settings.seq_len
    c.data.global_batch_size = settings.batch_size
    c.data.seed = settings.seed
    c.optimizer.learning_rate = settings.learning_rate
    c.optimizer.warmup_steps = max(steps // 10, 1)
    c.optimizer.weight_decay = 0.0
    c.mesh.fsdp = 1
    c.train.objective = objective
    c.train.steps = steps
    c.train.log_every = 5
    c.checkpoint.every = 0
    c.checkpoint.keep = 1
    return c


class _Stages:
    """Numbered progress lines with the seconds since the run started."""

    def __init__(self, total: int):
        self.total, self.number, self.start = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.number += 1
        print(f"[{self.number}/{self.total} +{self.elapsed():.0f}s] {text}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def build_seed(settings: DemoSettings, workdir: Path, data: Path) -> tuple[Path, TrainResult]:
    """Random HF checkpoint -> flare-jax -> AR training on the task -> HF export (the seed)."""
    init_hf = workdir / "init_hf"
    write_random_checkpoint(init_hf, seed_config(settings), seed=settings.seed, dtype="float32")
    write_char_tokenizer(init_hf, ALPHABET)
    (init_hf / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    init = convert_hf(init_hf, workdir / "init")
    result = train(train_config(settings, workdir / "seed_run", init, data, "causal",
                                settings.seed_steps))
    return export_hf(result.export_dir, workdir / "seed_hf"), result


def self_distilled_data(settings: DemoSettings, seed: Path, files: TaskFiles, output: Path
                        ) -> Path:
    """The seed's own answers to the training prompts (the self-distillation tool): transfer data
    matched to the seed's distribution, as a user without the seed's training data would make."""
    return self_distill(
        files.prompts, Sampler.load(seed), DocumentTokenizer.from_dir(str(seed)), output,
        settings=GenerationSettings(max_new_tokens=settings.task.digits + 1, seed=settings.seed),
        batch_size=DISTILL_BATCH, chunk_size=4 * DISTILL_BATCH)


def run_ablation(settings: DemoSettings, workdir: Path, seed: Path, files: TaskFiles
                 ) -> list[ResultRow]:
    """FLARE conversion of the seed on mismatched transfer data (the training prompts answered
    by another rule); its AR row, to set against the seed-matched conversion's."""
    data = write_relabelled(workdir / "data" / "mismatched.jsonl", files.prompts, MISMATCHED_TASK)
    run = train(train_config(settings, workdir / "flare_mismatched", seed, data, "flare",
                             settings.flare_steps))
    return evaluate_checkpoint(f"FLARE, {MISMATCHED_TASK.name} data", run.export_dir, files,
                               settings, decoding_modes(settings)[:1])


def run_demo(workdir: Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the demo in ``workdir`` (replaced if it exists); returns what ``results.json`` holds."""
    settings = settings or DemoSettings()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    stage = _Stages(6 if settings.ablation else 5)
    files = write_task_files(workdir / "data", settings.task, train=settings.train_examples,
                             heldout=settings.heldout_examples,
                             evaluation=settings.eval_examples, seed=settings.seed)
    stage(f"task '{settings.task.name}' ({settings.task.description}): "
          f"{settings.train_examples} training examples in {files.train.parent}")

    stage(f"seed: random Qwen3.5-style model, {settings.seed_steps} AR training steps")
    seed_hf, seed_run = build_seed(settings, workdir, files.train)
    print(f"      seed checkpoint (HF format): {seed_hf}")

    stage("conversion: HF seed -> flare-jax, then FLARE training "
          f"({settings.flare_steps} steps, block size {settings.block_size})")
    converted = convert_hf(seed_hf, workdir / "seed_converted")
    distilled = self_distilled_data(settings, converted, files,
                                    workdir / "data" / "self_distilled.jsonl")
    print(f"      transfer data: the seed's answers to the training prompts ({distilled})")
    flare_run = train(train_config(settings, workdir / "flare_run", converted, distilled,
                                   "flare", settings.flare_steps))

    stage("evaluation: exact match, tokens per forward, held-out AR loss")
    rows = evaluate_checkpoint("seed", converted, files, settings, decoding_modes(settings)[:1])
    rows += evaluate_checkpoint("FLARE", flare_run.export_dir, files, settings,
                                decoding_modes(settings))
    if settings.ablation:
        stage(f"ablation: FLARE on mismatched transfer data ({MISMATCHED_TASK.description} "
              "instead of the seed's answers)")
        rows += run_ablation(settings, workdir, converted, files)
    stage("results")
    print_table(rows)
    plot = plot_losses(seed_run.history, flare_run.history, workdir / "losses.png")
    results = {"task": settings.task.name, "settings": _settings_dict(settings),
               "rows": [dataclasses.asdict(r) for r in rows],
               "seed_history": seed_run.history, "flare_history": flare_run.history,
               "seconds": stage.elapsed()}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {workdir / 'results.json'}; loss plot: {plot}; "
          f"total {results['seconds']:.0f}s")
    return results


def _settings_dict(settings: DemoSettings) -> dict[str, Any]:
    fields = dataclasses.asdict(settings)
    fields["task"] = settings.task.name
    return fields
