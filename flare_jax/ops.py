"""The model's entry points to the kernels: one function per op, backend resolved by the kernel API.

Model code calls these and never branches on the platform. Sharding of Pallas calls under a mesh
(``shard_map`` over batch and heads) belongs here as well.
"""

from __future__ import annotations

import jax

from pallas_kernels.block_attention import api as attention_api
from pallas_kernels.block_attention.mask import TokenLayout
from pallas_kernels.gated_delta import api as gated_delta_api
from pallas_kernels.gated_delta.api import GatedDeltaInputs


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
              kv_layout: TokenLayout, *, backend: str = "auto") -> jax.Array:
    """Softmax attention under the FLARE visibility rule of the two layouts (GQA by head groups)."""
    return attention_api.block_attention(q, k, v, q_layout, kv_layout, backend=backend)


def gated_delta(inputs: GatedDeltaInputs, *, segment_ids: jax.Array,
                initial_state: jax.Array | None = None, backend: str = "auto"
                ) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule over one stream with document resets; returns ``(o, final_state)``."""
    return gated_delta_api.gated_delta_rule(*inputs, segment_ids=segment_ids,
                                            initial_state=initial_state, backend=backend)


def gated_delta_handoff(clean: GatedDeltaInputs, noisy: GatedDeltaInputs, *, segment_ids: jax.Array,
                        block_size: int, backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """FLARE handoff: noisy blocks start from the clean state at their block boundary.

    Returns ``(o_clean, o_noisy)``.
    """
    o_clean, o_noisy, _ = gated_delta_api.gated_delta_rule_handoff(
        clean, noisy, block_size=block_size, segment_ids=segment_ids, backend=backend)
    return o_clean, o_noisy
