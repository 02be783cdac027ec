"""The name kernels' custom VJPs give their residuals, so that a remat policy can keep them.

Under ``jax.checkpoint`` a custom VJP's residuals are recomputed in the backward pass (the
kernel's forward runs again) unless the policy saves them; naming them lets a policy such as
``save_only_these_names(KERNEL_RESIDUAL, ...)`` keep exactly these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from jax.ad_checkpoint import checkpoint_name

KERNEL_RESIDUAL = "kernel_residual"

T = TypeVar("T")


def named_residuals(residuals: T) -> T:
    """``residuals`` (any pytree of arrays) marked as :data:`KERNEL_RESIDUAL`."""
    return checkpoint_name(residuals, KERNEL_RESIDUAL)


def with_named_residuals(fn: Callable[..., jax.Array]
                         ) -> Callable[[tuple[jax.Array, ...], tuple[jax.Array, ...]], jax.Array]:
    """``fn`` (one array out) as ``call(differentiable, metadata)`` whose VJP is ``fn``'s own
    with its residuals marked :data:`KERNEL_RESIDUAL`: for a kernel whose custom VJP (someone
    else's, such as XLA's cuDNN attention) leaves them unnamed. ``fn`` takes the arrays of the
    tuple ``differentiable`` then those of ``metadata`` (integer arrays; no gradient)."""

    @jax.custom_vjp
    def call(differentiable: tuple, metadata: tuple) -> jax.Array:
        return fn(*differentiable, *metadata)

    def forward(differentiable: tuple, metadata: tuple):
        out, pullback = jax.vjp(lambda *args: fn(*args, *metadata), *differentiable)
        return out, named_residuals(pullback)

    def backward(pullback, d_out: jax.Array) -> tuple:
        return pullback(d_out), None

    call.defvjp(forward, backward)
    return call
