"""Backend names shared by every kernel family's ``api.py``."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "reference", "gpu", "tpu", "gpu_interpret", "tpu_interpret")


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the platform's kernel (``gpu`` / ``tpu``), or ``reference`` on CPU;
    ``*_interpret`` run a Pallas kernel in interpret mode (CPU tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    return platform if platform in ("gpu", "tpu") else "reference"
