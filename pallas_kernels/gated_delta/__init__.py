"""Chunked gated delta rule (Gated DeltaNet) kernels: reference, Pallas GPU / TPU, public API."""

from pallas_kernels.gated_delta.api import (
    GatedDeltaInputs,
    gated_delta_rule,
    gated_delta_rule_handoff,
)

__all__ = ["GatedDeltaInputs", "gated_delta_rule", "gated_delta_rule_handoff"]
