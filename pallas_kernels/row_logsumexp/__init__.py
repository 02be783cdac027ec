"""Row-wise logsumexp of a wide ``[N, V]`` array (the LM head's logits), read once: a Pallas GPU
kernel with an online max / sum per row, XLA elsewhere."""

from pallas_kernels.row_logsumexp.api import row_logsumexp

__all__ = ["row_logsumexp"]
