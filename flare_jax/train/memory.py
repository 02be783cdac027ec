"""Device memory pool of a training process.

XLA's GPU allocator takes 75% of each device's memory unless told otherwise. That leaves the
Qwen3.5-0.8B batch-4 step (59.2 GiB, docs/performance.md) no room on an 80 GB H100, so training
entry points raise the share to :data:`MEMORY_FRACTION` when the environment does not set the pool.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

MEMORY_FRACTION = 0.9
# Variables with which a user already sets XLA's GPU memory pool.
POOL_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                  "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def default_memory_fraction(environ: MutableMapping[str, str] | None = None,
                            fraction: float = MEMORY_FRACTION) -> bool:
    """Set ``XLA_CLIENT_MEM_FRACTION`` to ``fraction`` unless ``environ`` (default
    ``os.environ``) already sets the pool through one of :data:`POOL_VARIABLES`.

    Only takes effect before JAX starts its GPU backend (the first device use); CPU and TPU
    ignore it. Returns whether it set the variable.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in POOL_VARIABLES):
        return False
    environ["XLA_CLIENT_MEM_FRACTION"] = str(fraction)
    return True
