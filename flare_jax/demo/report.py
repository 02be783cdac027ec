"""The demo's outputs: the results table on stdout and the plot of both training losses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ResultRow:
    """One model in one decoding mode. ``same_as_ar``: fraction of outputs identical to the same
    model's AR output (None for AR rows); ``heldout_nll``: AR loss on held-out data (AR rows)."""

    model: str
    mode: str
    accuracy: float
    tokens_per_forward: float
    tokens_per_second: float
    same_as_ar: float | None
    heldout_nll: float | None


def print_table(rows: Sequence[ResultRow]) -> None:
    """The results table (accuracy in percent), its first two columns as wide as their longest
    entry."""
    model_w = max([len("model"), *(len(r.model) for r in rows)])
    mode_w = max([len("mode"), *(len(r.mode) for r in rows)])
    print(f"  {'model':<{model_w}} {'mode':<{mode_w}} {'exact match':>11} {'tok/fwd':>8} "
          f"{'tok/s':>7} {'same as AR':>10} {'held-out AR loss':>16}")
    for r in rows:
        same = "" if r.same_as_ar is None else f"{100 * r.same_as_ar:.0f}%"
        nll = "" if r.heldout_nll is None else f"{r.heldout_nll:.4f}"
        print(f"  {r.model:<{model_w}} {r.mode:<{mode_w}} {100 * r.accuracy:>10.1f}% "
              f"{r.tokens_per_forward:>8.2f} {r.tokens_per_second:>7.0f} {same:>10} {nll:>16}")


def plot_losses(seed_history: Sequence[dict[str, Any]], flare_history: Sequence[dict[str, Any]],
                path: Path) -> Path:
    """Save a PNG of the seed's AR loss and the FLARE run's AR and diffusion losses per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (seed_ax, flare_ax) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    seed_ax.plot([r["step"] for r in seed_history], [r["ar_loss"] for r in seed_history],
                 label="AR loss")
    seed_ax.set(title="seed: AR training", xlabel="step", ylabel="loss (nats/token)")
    steps = [r["step"] for r in flare_history]
    flare_ax.plot(steps, [r["ar_loss"] for r in flare_history], label="AR loss (clean stream)")
    flare_ax.plot(steps, [r["diffusion_loss"] for r in flare_history],
                  label="diffusion loss (noisy stream)")
    flare_ax.set(title="FLARE conversion", xlabel="step")
    for ax in (seed_ax, flare_ax):
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
