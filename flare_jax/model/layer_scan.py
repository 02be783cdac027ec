"""Running a stack of decoder layers: unrolled, or as one ``lax.scan`` over repeated layer groups.

A hybrid stack repeats one group pattern (Qwen3.5: three linear layers, then a full one). Unrolled,
every layer (and its kernels) is a separate piece of the compiled program; scanned, the group body
is compiled once. The parameters stay per layer (the module tree, checkpoints and sharding rules do
not change): at call time the states of the layers that play the same role in every group are
stacked, and the scan body merges each role's graph with its slice of the stack. Gradients flow
back through the stack to the per-layer parameters. Both paths run the same operations in the same
dtypes.

Remat (``remat``, one of :data:`REMAT_POLICIES`) recomputes each layer in the backward pass:
``"full"`` keeps only the layer's input; ``"selective"`` also keeps every dense projection's
output, every op's output and the kernels' residuals (the names ``layers.PROJECTION``,
``ops.OP_OUTPUT``, ``residuals.KERNEL_RESIDUAL``), so the backward pass recomputes only the
elementwise work (norms, gates, activations, the l2 normalisation) and runs no matmul or kernel
forward twice; ``"selective_inputs"`` also keeps every projection's input
(``layers.PROJECTION_INPUT``: the norm outputs, the SwiGLU activation, the gated outputs), so
the backward pass recomputes nothing a matmul reads, only what the elementwise backward needs;
``"none"`` keeps everything autodiff saves.

Layers may also return auxiliary sums (the MoE router statistics): they are added up over the
layers, carried through the scan next to the hidden states. With none (``aux=None``, dense models)
the carry is the hidden state alone, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.model.layers import PROJECTION, PROJECTION_INPUT
from flare_jax.ops import OP_OUTPUT
from pallas_kernels.residuals import KERNEL_RESIDUAL

# (layer, hidden) -> (hidden, the layer's auxiliary sums: a pytree shaped like run_layers' aux)
LayerFn = Callable[[nnx.Module, jax.Array], tuple[jax.Array, Any]]


REMAT_POLICIES = ("none", "full", "selective", "selective_inputs")
_SELECTIVE = (PROJECTION, OP_OUTPUT, KERNEL_RESIDUAL)
_SAVED = {"full": None,
          "selective": jax.checkpoint_policies.save_only_these_names(*_SELECTIVE),
          "selective_inputs": jax.checkpoint_policies.save_only_these_names(*_SELECTIVE,
                                                                            PROJECTION_INPUT)}


def check_remat(remat: str) -> None:
    """Raise ``ValueError`` unless ``remat`` is one of :data:`REMAT_POLICIES`."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


def checkpoint_policy(remat: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of a remat policy other than ``"none"`` (None: save
    nothing but the inputs)."""
    check_remat(remat)
    return _SAVED[remat]


def _signature(layer: nnx.Module) -> tuple:
    """What layers must share to be stacked: graph, state structure, shapes and dtypes."""
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)
    return graphdef, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves)


def group_period(layers: Sequence[nnx.Module]) -> int | None:
    """The smallest group size ``p`` such that layer ``i`` has the graph and parameter shapes of
    layer ``i - p`` for every ``i >= p``, with at least two full groups; None if there is none."""
    signatures = [_signature(layer) for layer in layers]
    n = len(signatures)
    for p in range(1, n // 2 + 1):
        if all(signatures[i] == signatures[i - p] for i in range(p, n)):
            return p
    return None


def run_layers(layers: Sequence[nnx.Module], h: jax.Array, apply: LayerFn, *, scan: bool,
               remat: str = "none", aux: Any = None) -> tuple[jax.Array, Any]:
    """``h, layer_aux = apply(layer, h)`` for every layer in order; returns the final ``h`` and
    ``aux`` plus the sum of every ``layer_aux`` (same pytree structure; ``None`` for none).
    ``remat`` (:data:`REMAT_POLICIES`) says what each layer keeps for the backward pass.

    With ``scan`` and a repeating stack (:func:`group_period`) the full groups run as one
    ``lax.scan`` over stacked per-role states and any leftover layers run unrolled after it;
    otherwise every layer runs unrolled.
    """
    check_remat(remat)
    period = group_period(layers) if scan else None
    if period is None:
        run = apply if remat == "none" else nnx.remat(apply, policy=checkpoint_policy(remat))
        for layer in layers:
            h, layer_aux = run(layer, h)
            aux = jax.tree.map(jnp.add, aux, layer_aux)
        return h, aux
    groups = len(layers) // period
    split = [nnx.split(layer) for layer in layers[:groups * period]]

    def role_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, Any]]:
        def fn(state: nnx.State, x: jax.Array) -> tuple[jax.Array, Any]:
            return apply(nnx.merge(graphdef, state), x)

        # prevent_cse=False: the scan already keeps the recomputation out of the forward pass.
        return fn if remat == "none" else jax.checkpoint(fn, prevent_cse=False,
                                                         policy=checkpoint_policy(remat))

    roles = [role_fn(graphdef) for graphdef, _ in split[:period]]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in split[r::period]))
               for r in range(period)]

    def body(carry: tuple[jax.Array, Any], group: list[nnx.State]) -> tuple[tuple, None]:
        x, total = carry
        for fn, state in zip(roles, group, strict=True):
            x, layer_aux = fn(state, x)
            total = jax.tree.map(jnp.add, total, layer_aux)
        return (x, total), None

    (h, aux), _ = jax.lax.scan(body, (h, aux), stacked)
    return run_layers(layers[groups * period:], h, apply, scan=False, remat=remat, aux=aux)
