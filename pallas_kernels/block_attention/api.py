"""Public entry point of block-diffusion attention: one function, backend dispatch, custom VJP."""

from __future__ import annotations

import functools

import jax
import numpy as np

from pallas_kernels.backend import resolve_backend
from pallas_kernels.block_attention import gpu, tpu
from pallas_kernels.block_attention.mask import TokenLayout
from pallas_kernels.block_attention.reference import block_attention_reference
from pallas_kernels.residuals import named_residuals

_KERNELS = {"gpu": gpu, "tpu": tpu}


def _float0_like(layout: TokenLayout) -> TokenLayout:
    return jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_attention(q, k, v, q_layout, kv_layout, scale: float, backend: str):
    return _kernel_fwd(q, k, v, q_layout, kv_layout, scale, backend)[0]


def _kernel_fwd(q, k, v, q_layout, kv_layout, scale, backend):
    kernel = _KERNELS[backend.removesuffix("_interpret")]
    out, lse = kernel.forward(q, k, v, q_layout, kv_layout, scale=scale,
                              interpret=backend.endswith("_interpret"))
    return out, named_residuals((q, k, v, q_layout, kv_layout, out, lse))


def _kernel_bwd(scale, backend, residuals, d_out):
    q, k, v, q_layout, kv_layout, out, lse = residuals
    kernel = _KERNELS[backend.removesuffix("_interpret")]
    dq, dk, dv = kernel.backward(q, k, v, q_layout, kv_layout, out, lse, d_out, scale=scale,
                                 interpret=backend.endswith("_interpret"))
    return dq, dk, dv, _float0_like(q_layout), _float0_like(kv_layout)


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "backend"))
def block_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_layout: TokenLayout,
    kv_layout: TokenLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """GQA attention of q ``[B, Tq, Hq, D]`` over k, v ``[B, Tk, Hkv, D]`` under the layouts' mask.

    Query head ``h`` reads kv head ``h // (Hq // Hkv)``. Visibility is
    :func:`pallas_kernels.block_attention.mask.visible`; softmax in fp32; a query with no visible
    key outputs 0. ``backend``: auto | reference | gpu | tpu | gpu_interpret | tpu_interpret (the
    Pallas kernels in interpret mode, for CPU tests). Returns ``[B, Tq, Hq, D]`` in q's dtype.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return block_attention_reference(q, k, v, q_layout, kv_layout, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _kernel_attention(q, k, v, q_layout, kv_layout, scale, backend)
