"""Depthwise causal conv1d + SiLU of the Gated DeltaNet: document masks, a decoding context and the
FLARE handoff, with a Pallas GPU backward kernel."""

from pallas_kernels.causal_conv.api import causal_conv_silu

__all__ = ["causal_conv_silu"]
