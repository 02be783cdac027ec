"""Constants and the hand computation shared by the evaluation tests."""

from __future__ import annotations

import os
import string

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # set before datasets is imported: never fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import flare_jax  # noqa: E402

ALPHABET = string.ascii_letters + string.digits + string.punctuation[:29]  # 91 + 5 special = 96
WIDTH = 64  # every hand computation runs at this padded length: one compile of model.logits
# fp32 logits of the same model at different packings/shapes differ by float rounding only; sums of
# up to ~60 log-probabilities of size ~5 stay within 1e-4 absolute.
ATOL = 1e-4
# prompts whose greedy outputs (the seed-7 tiny model) all hold a number; one batch of 8 everywhere
PROMPTS = ["ab1", "xyz", "Q7:", "hello", "42+", "zz", "k=3", "pq"]
MAX_NEW = 16
# an lm-eval task yaml over a local jsonl (the datasets "json" builder: nothing is downloaded)
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: {output_type}
{fields}
"""
FIELDS = {
    "multiple_choice": 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                       'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc',
    "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                             'metric_list:\n  - metric: word_perplexity',
    "generate_until": 'doc_to_text: "{{question}}"\ndoc_to_target: "{{label}}"\n'
                      'generation_kwargs:\n  until: ["{stop}"]\n  max_gen_toks: {max_new}\n'
                      'metric_list:\n  - metric: exact_match',
}


def hand_logprobs(model: flare_jax.Model, tokens: list[int]) -> np.ndarray:
    """``log p(tokens[i] | tokens[:i])`` for i >= 1 (float64 log-softmax of fp32 logits)."""
    padded = np.zeros(WIDTH, np.int32)
    padded[:len(tokens)] = tokens
    logits = model.logits(padded, (np.arange(WIDTH) < len(tokens)).astype(np.int32))
    logits = logits[:len(tokens) - 1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - logz
