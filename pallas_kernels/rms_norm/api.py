"""Public RMSNorm: backend dispatch and the GPU kernels' custom VJP."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from pallas_kernels.backend import resolve_backend
from pallas_kernels.residuals import named_residuals
from pallas_kernels.rms_norm import gpu, reference


class _Static(NamedTuple):
    eps: float
    unit_offset: bool
    tiling: gpu.Tiling
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gpu_norm(static: _Static, x: jax.Array, weight: jax.Array, gate: jax.Array | None
              ) -> jax.Array:
    return _fwd(static, x, weight, gate)[0]


def _fwd(static, x, weight, gate):
    y, rstd = gpu.forward(x, weight, gate, eps=static.eps, unit_offset=static.unit_offset,
                          tiling=static.tiling, interpret=static.interpret)
    # x, weight and the gate are the caller's arrays (a remat policy keeps or rebuilds them);
    # rstd is the kernel's own, kept by name
    return y, (x, weight, gate, named_residuals(rstd))


def _bwd(static, residuals, dy):
    x, weight, gate, rstd = residuals
    dx, d_gate, d_weight = gpu.backward(x, weight, gate, rstd, dy, unit_offset=static.unit_offset,
                                        tiling=static.tiling, interpret=static.interpret)
    return dx, d_weight.astype(weight.dtype), d_gate


_gpu_norm.defvjp(_fwd, _bwd)


def rms_norm(x: jax.Array, weight: jax.Array, *, gate: jax.Array | None = None, eps: float,
             unit_offset: bool, backend: str = "auto", tiling: gpu.Tiling | None = None
             ) -> jax.Array:
    """``x / rms(x) * scale [* silu(gate)]`` over the last axis of ``x [..., D]`` (see
    :func:`.reference.rms_norm`), in ``x``'s dtype, differentiable in ``x``, ``weight [D]`` and
    ``gate``.

    backend: ``gpu`` runs the Pallas kernels where ``D`` is a power of two (``gpu_interpret``:
    in interpret mode, any ``D``); otherwise, and on every other backend, XLA runs the reference.
    """
    width = x.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"rms_norm: weight must be [{width}] for x {x.shape}, got {weight.shape}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"rms_norm: gate must be shaped like x {x.shape}, got {gate.shape}")
    backend = resolve_backend(backend)
    power_of_two = width & (width - 1) == 0
    if backend == "gpu_interpret" or (backend == "gpu" and power_of_two):
        static = _Static(float(eps), unit_offset, tiling or gpu.Tiling(), backend == "gpu_interpret")
        rows_gate = None if gate is None else gate.reshape(-1, width)
        return _gpu_norm(static, x.reshape(-1, width), weight, rows_gate).reshape(x.shape)
    return reference.rms_norm(x, weight, gate, eps=eps, unit_offset=unit_offset)
