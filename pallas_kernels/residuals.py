"""The name kernels' custom VJPs give their residuals, so that a remat policy can keep them.

Under ``jax.checkpoint`` a custom VJP's residuals are recomputed in the backward pass (the
kernel's forward runs again) unless the policy saves them; naming them lets a policy such as
``save_only_these_names(KERNEL_RESIDUAL, ...)`` keep exactly these.
"""

from __future__ import annotations

from typing import TypeVar

from jax.ad_checkpoint import checkpoint_name

KERNEL_RESIDUAL = "kernel_residual"

T = TypeVar("T")


def named_residuals(residuals: T) -> T:
    """``residuals`` (any pytree of arrays) marked as :data:`KERNEL_RESIDUAL`."""
    return checkpoint_name(residuals, KERNEL_RESIDUAL)
