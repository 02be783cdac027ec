"""Records -> token ids and loss masks with the checkpoint's HF tokenizer.

A document is ``encode(text) + [eos]``. Plain text trains on every token (EOS included). Chat trains
only on tokens whose first character lies in an assistant span (see :mod:`flare_jax.data.chat`),
plus the appended EOS when the conversation ends with an assistant turn. Text is encoded without
the tokenizer's own special-token post-processing (a chat template writes its special tokens).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tokenizers

from flare_jax.data.chat import ChatTemplate, RenderFn, chatml, jinja_template
from flare_jax.data.records import Record

DEFAULT_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")


class DocumentTokenizer:
    """Callable ``Record -> {"tokens": int32[n], "loss_mask": bool[n]}``."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_id: int, render: RenderFn = chatml):
        if tokenizer.id_to_token(eos_id) is None:
            raise ValueError(f"eos_id {eos_id} is not in the tokenizer's vocabulary")
        if render is chatml:
            missing = [t for t in DEFAULT_TEMPLATE_TOKENS if tokenizer.token_to_id(t) is None]
            if missing:
                raise ValueError(
                    f"the default ChatML template needs special tokens {missing} in the tokenizer"
                )
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.template = ChatTemplate(render)

    @classmethod
    def from_dir(cls, path: str, eos_token: str | None = None) -> DocumentTokenizer:
        """Load ``tokenizer.json`` from a checkpoint dir; EOS and the chat template come from
        ``tokenizer_config.json`` / ``chat_template.jinja`` when present (``eos_token`` overrides)."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        eos_token = eos_token or _token_text(config.get("eos_token"))
        if eos_token is None:
            raise ValueError(f"{path}: tokenizer_config.json names no eos_token; pass eos_token")
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"{path}: eos_token {eos_token!r} is not in the vocabulary")
        source = _chat_template_source(path, config)
        render = chatml if source is None else jinja_template(
            source, _token_text(config.get("bos_token")) or "", eos_token
        )
        return cls(tokenizer, eos_id, render)

    def __call__(self, record: Record) -> dict[str, np.ndarray]:
        if record.is_chat:
            text, spans = self.template.render_with_spans(record.messages)
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
            loss_mask = _span_mask(encoding.offsets, spans)
            eos_trained = record.messages[-1].role == "assistant"
        else:
            encoding = self.tokenizer.encode(record.text, add_special_tokens=False)
            loss_mask = np.ones(len(encoding.ids), bool)
            eos_trained = True
        return {
            "tokens": np.asarray([*encoding.ids, self.eos_id], np.int32),
            "loss_mask": np.append(loss_mask, eos_trained),
        }


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens whose first character lies in one of the ``[start, end)`` spans."""
    starts = np.asarray([start for start, _ in offsets], np.int64)
    mask = np.zeros(len(starts), bool)
    for begin, end in spans:
        mask |= (starts >= begin) & (starts < end)
    return mask


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(token: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template_source(path: str, config: dict[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
