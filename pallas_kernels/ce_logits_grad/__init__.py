"""The cross-entropy gradient of a wide ``[N, V]`` logits array (the LM head's),
``w (softmax - onehot)``, from the stored logits and their logsumexp: a Pallas GPU kernel,
XLA elsewhere."""

from pallas_kernels.ce_logits_grad.api import ce_logits_grad

__all__ = ["ce_logits_grad"]
