"""lm-evaluation-harness model ``flare-jax``: log-likelihoods from the causal mode, generation in
any decoding mode. Importing this module registers it; ``python -m flare_jax.eval.lm_eval_adapter``
is the harness command line with the model registered::

    python -m flare_jax.eval.lm_eval_adapter --model flare-jax \\
        --model_args checkpoint=ckpt,mode=diffusion,block_size=32,threshold=0.9 --tasks gsm8k

Needs the ``eval`` extra (``pip install flare-jax[eval]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own models stay registered next to ours)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from flare_jax.data.records import Message
from flare_jax.eval.likelihood import rolling_windows, score_sequences
from flare_jax.sampling.sampler import Sampler

DEFAULT_BATCH_SIZE = 8


@register_model("flare-jax")
class FlareJaxLM(TemplateLM):
    """A flare-jax checkpoint (with ``tokenizer.json``) as a harness model.

    ``mode``, ``block_size``, ``threshold``, ``steps_per_block``, ``sub_blocks`` and
    ``logit_shift`` configure ``generate_until`` (see :meth:`Sampler.generate`); log-likelihoods
    always use the causal mode. Sequences longer than ``max_length`` keep their last tokens.
    ``device`` and ``max_batch_size`` (passed by the harness) are ignored: JAX places the model.
    """

    def __init__(self, checkpoint: str, mode: str = "ar", block_size: int = 8,
                 threshold: float = 0.9, steps_per_block: int = 0, sub_blocks: int = 1,
                 logit_shift: bool = False, dtype: str = "float32", backend: str = "auto",
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int = 2048,
                 max_gen_toks: int = 256, device: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        self.sampler = Sampler.load(checkpoint, dtype=dtype, backend=backend)
        if self.sampler.tokenizer is None:
            raise ValueError(f"{checkpoint}: the lm-eval adapter needs the checkpoint's "
                             "tokenizer.json")
        eos = self.sampler.model.config.eos_token_id
        if not eos:
            raise ValueError(f"{checkpoint}: the model config names no eos_token_id")
        self.checkpoint = str(checkpoint)
        self.decoding = dict(mode=mode, block_size=int(block_size), threshold=float(threshold),
                             steps_per_block=int(steps_per_block), sub_blocks=int(sub_blocks),
                             logit_shift=bool(logit_shift))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self._eot = int(eos[0])

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (the tokenizer adds no special tokens of its own)."""
        return self.sampler.tokenizer.encode(string, add_special_tokens=False).ids

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render a chat with the checkpoint's template."""
        if self.sampler.chat_template is None:
            raise ValueError(f"{self.checkpoint}: no chat template (chat_template.jinja or "
                             "ChatML tokens) in the checkpoint")
        messages = [Message(m["role"], m["content"]) for m in chat_history]
        return self.sampler.chat_template(messages, add_generation_prompt)

    def _score(self, sequences: Sequence[list[int]], masks: Sequence[list[bool]]):
        return score_sequences(self.sampler.model, sequences, masks, max_length=self.max_length,
                               batch_size=self.batch_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        sequences, masks = [], []
        for _, context, continuation in requests:
            if not 0 < len(continuation) < self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                                 f"max_length={self.max_length} with context")
            tokens = (context + continuation)[-self.max_length:]
            sequences.append(tokens)
            masks.append([False] * (len(tokens) - len(continuation)) + [True] * len(continuation))
        results = []
        for (key, _, _), score in zip(requests, self._score(sequences, masks), strict=True):
            answer = (score.logprob, score.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string after the EOS token, in rolling windows."""
        sequences, masks, owner = [], [], []
        for i, request in enumerate(requests):
            (string,) = request.args
            tokens = [self.prefix_token_id, *self.tok_encode(string)]
            for window, mask in rolling_windows(tokens, [True] * len(tokens), self.max_length):
                sequences.append(window)
                masks.append(mask)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owner, self._score(sequences, masks), strict=True):
            totals[i] += score.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate in the configured mode until a stop string, EOS or ``max_gen_toks``."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            settings = self._generation_settings(requests[indices[0]].args[1])
            budget = self.max_length - settings["max_new_tokens"]
            if budget < 1:
                raise ValueError(f"max_gen_toks {settings['max_new_tokens']} leaves no room for "
                                 f"a prompt in max_length={self.max_length}")
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first:first + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-budget:] or [self.eot_token_id]
                           for i in chunk]
                results = self.sampler.generate(prompts, **self.decoding, **settings)
                for i, result in zip(chunk, results, strict=True):
                    outputs[i] = result.text or ""
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Sampler arguments from the harness's ``gen_kwargs`` (greedy unless ``do_sample``)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False))
        return dict(stop=until, max_new_tokens=int(gen_kwargs.get("max_gen_toks",
                                                                  self.max_gen_toks)),
                    temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                    top_k=int(gen_kwargs.get("top_k", 0) or 0),
                    top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))


def main() -> None:
    """The harness command line (``lm_eval ...`` arguments) with ``flare-jax`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
