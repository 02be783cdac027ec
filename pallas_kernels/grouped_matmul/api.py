"""Public grouped matmul: backend dispatch and the kernels' custom VJP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import resolve_backend
from pallas_kernels.grouped_matmul import gpu
from pallas_kernels.residuals import named_residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(interpret: bool, x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return gpu.grouped_matmul(x, w, group_sizes, interpret=interpret)


def _kernel_fwd(interpret, x, w, group_sizes):
    # The weights are the layer's parameters, available to the backward pass anyway: only the
    # activations are named (a saved copy of the experts per scanned layer would be large).
    out = gpu.grouped_matmul(x, w, group_sizes, interpret=interpret)
    return out, (named_residuals(x), w, group_sizes)


def _kernel_bwd(interpret, residuals, d_out):
    x, w, group_sizes = residuals
    d_out = d_out.astype(x.dtype)
    dx = gpu.grouped_matmul(d_out, w, group_sizes, transpose_w=True, interpret=interpret)
    dw = gpu.grouped_outer(x, d_out, group_sizes, interpret=interpret)
    return (dx.astype(x.dtype), dw.astype(w.dtype),
            np.zeros(group_sizes.shape, jax.dtypes.float0))


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   precision: jax.lax.PrecisionLike = None,
                   backend: str = "auto") -> jax.Array:
    """``jax.lax.ragged_dot(x, w, group_sizes)`` with an fp32 result: rows ``x [M, C]`` sorted by
    group, group ``g`` (the next ``group_sizes[g]`` rows) times ``w[g]`` of ``w [G, C, D]``.

    ``backend``: ``reference`` (and ``tpu``, whose XLA lowers ``ragged_dot`` to a grouped matmul)
    run ``ragged_dot``; ``gpu`` runs the Pallas kernels (XLA's GPU ``ragged_dot`` computes every
    group on every row: ``G`` times the work, and at MoE sizes more memory than the device has);
    ``gpu_interpret`` runs them in interpret mode. The kernels' cotangents reuse the forward
    kernel (``dx = dy w[g]^T``) and a per-group outer product (``dw[g] = x_g^T dy_g``), with
    ``dy`` rounded to ``x``'s dtype (fp32 accumulation throughout).
    """
    backend = resolve_backend(backend)
    if backend in ("gpu", "gpu_interpret"):
        return _kernel(backend == "gpu_interpret", x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes, precision=precision,
                              preferred_element_type=jnp.float32)
