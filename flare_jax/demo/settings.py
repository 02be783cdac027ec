"""The sizes of a demo run (kept apart from the pipeline so the CLI can read the defaults
without importing JAX)."""

from __future__ import annotations

import dataclasses

from flare_jax.demo.task import ADD_THREE, DigitTask


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run; the defaults fit ~10 minutes on a 2-core CPU."""

    task: DigitTask = ADD_THREE
    train_examples: int = 6000
    heldout_examples: int = 256
    eval_examples: int = 128
    seed_steps: int = 100
    flare_steps: int = 120
    seq_len: int = 72
    batch_size: int = 32
    learning_rate: float = 3e-3
    block_size: int = 8
    thresholds: tuple[float, float] = (0.9, 0.6)
    hidden_size: int = 128
    seed: int = 0
    ablation: bool = False  # also convert on mismatched transfer data
