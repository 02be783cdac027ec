"""AdamW with linear warmup, cosine decay and global-norm clipping, on fp32 master parameters."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           min_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
    ``peak * min_ratio`` at ``total_steps``."""
    decay_steps = max(total_steps - warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float, weight_decay: float, b1: float, b2: float, eps: float,
                   clip_norm: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule. Weight decay skips 1-D parameters (norms, decays, biases).

    Parameters and optimizer moments are fp32 (the parameters are kept fp32; the model casts to
    its compute dtype).
    """
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, min_lr_ratio)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask, mu_dtype="float32")
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    return optax.chain(*chain, adamw), schedule
