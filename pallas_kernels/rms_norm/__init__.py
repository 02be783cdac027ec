"""RMSNorm over the last axis (Qwen3.5's ``(1 + w)`` norm and the Gated DeltaNet's gated norm):
Pallas GPU kernels that read each row once forward and once backward, XLA elsewhere."""

from pallas_kernels.rms_norm.api import rms_norm

__all__ = ["rms_norm"]
