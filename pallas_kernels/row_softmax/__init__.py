"""Row softmax terms of a wide ``[N, V]`` array (the LM head's logits): ``exp(x - m)`` with one
offset ``m`` per row, written once, and the row logsumexp, reading the input once: a Pallas GPU
kernel, XLA elsewhere."""

from pallas_kernels.row_softmax.api import RowSoftmax, row_softmax

__all__ = ["RowSoftmax", "row_softmax"]
