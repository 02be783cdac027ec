"""Basic layers: dense projections, RMSNorm (1 + w) and gated RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Dtype = jnp.dtype | type
PROJECTION = "projection"  # the name of every dense projection's output (remat policies)
PROJECTION_INPUT = "projection_input"  # ... and of its input, in the compute dtype


def matmul_precision(dtype: Dtype) -> jax.lax.Precision:
    """Full-precision matmuls for fp32 compute (parity runs), the fast default otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` in ``x``'s dtype (both operands in it), accumulated in
    fp32 and rounded once. Its backward keeps the compute dtype too: ``dx = g kernel^T`` and
    ``dkernel = x^T g`` take the cotangent ``g`` (already in ``x``'s dtype) with fp32
    accumulation. Autodiff of an fp32-accumulated einsum would instead hand the transposed matmuls
    an fp32 cotangent next to a bf16 operand, which XLA runs as fp32 matmuls."""
    return _project_fwd(x, kernel, precision)[0]


def _project_fwd(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32,
                   precision=precision)
    return y.astype(x.dtype), (x, kernel)


def _project_bwd(precision: jax.lax.Precision, residuals: tuple[jax.Array, jax.Array],
                 g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    g = g.astype(x.dtype)
    dx = jnp.einsum("...o,io->...i", g, kernel, preferred_element_type=jnp.float32,
                    precision=precision)
    dkernel = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32,
                         precision=precision)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Dense(nnx.Module):
    """``y = x @ kernel`` with ``kernel [in, out]``; compute in ``dtype``, accumulate in fp32
    (forward and backward, :func:`project`); ``x`` is named :data:`PROJECTION_INPUT` and ``y``
    :data:`PROJECTION` (what the remat policies keep)."""

    def __init__(self, in_features: int, out_features: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs, init_scale: float = 0.02):
        self.dtype = dtype
        self.kernel = nnx.Param(
            init_scale * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = checkpoint_name(x.astype(self.dtype), PROJECTION_INPUT)
        y = project(x, self.kernel[...].astype(self.dtype), matmul_precision(self.dtype))
        return checkpoint_name(y, PROJECTION)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x)`` over the last axis, computed in fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Qwen3.5 RMSNorm: fp32 normalisation scaled by ``(1 + weight)``, weight initialised to 0."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = 1.0 + self.weight[...].astype(jnp.float32)
        return (rms_normalize(x, self.eps) * scale).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Norm-then-gate of the Gated DeltaNet output: ``weight * norm(x) * silu(gate)``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        normed = rms_normalize(x, self.eps).astype(x.dtype)
        out = self.weight[...].astype(jnp.float32) * normed * jax.nn.silu(gate.astype(jnp.float32))
        return out.astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(hidden, intermediate, **kw)
        self.up_proj = Dense(hidden, intermediate, **kw)
        self.down_proj = Dense(intermediate, hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
