"""Chat templates and the character spans of assistant turns in a rendered conversation.

A template is a function ``render(messages, add_generation_prompt) -> str``: either the checkpoint's
Jinja ``chat_template`` (rendered in a sandbox with ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``) or the default ChatML template::

    <|im_start|>{role}\\n{content}<|im_end|>\\n        (one per message)
    <|im_start|>assistant\\n                            (the generation prompt)

The trained span of assistant turn ``i`` starts where the model would start generating: after
``render(messages[:i], add_generation_prompt=True)`` when the full rendering extends that prefix
(so template-inserted text such as empty think tags is trained on), else at the turn's content
(templates that rewrite earlier turns). It ends after the content plus the text the template
closes an assistant turn with (e.g. ``<|im_end|>\\n``), so the model learns to end its turns.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

from flare_jax.data.records import Message

RenderFn = Callable[[Sequence[Message], bool], str]
_SENTINEL = "\x00FLARE-TURN-END-PROBE\x00"


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered or whose assistant turns cannot be located."""


def chatml(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The default ChatML template (the format of Qwen chat models)."""
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def jinja_template(source: str, bos_token: str = "", eos_token: str = "") -> RenderFn:
    """A render function for an HF-style Jinja chat template (needs the ``jinja2`` package)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 comes with torch/transformers
        raise ImportError("rendering a checkpoint's chat_template needs jinja2") from e

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template raised: {message}")

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    template = env.from_string(source)

    def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )

    return render


class ChatTemplate:
    """A render function plus the assistant-span logic that depends on it."""

    def __init__(self, render: RenderFn):
        self.render = render
        probe = render([Message("user", "u"), Message("assistant", _SENTINEL)], False)
        index = probe.find(_SENTINEL)
        # The text the template writes right after an assistant turn's content.
        self.turn_end = probe[index + len(_SENTINEL):] if index >= 0 else ""

    def render_with_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """Render a conversation and return the ``[start, end)`` character span of each assistant
        turn (see the module docstring for where spans start and end)."""
        full = self.render(messages, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prefix = _try_render(self.render, messages[:i])
            consistent = prefix is not None and len(prefix) >= cursor and full.startswith(prefix)
            search_from = len(prefix) if consistent else cursor
            content = message.content.strip()
            found = full.find(content, search_from)
            if found < 0:
                raise ChatTemplateError(
                    f"assistant turn {i} does not appear verbatim in the rendered conversation"
                )
            start = search_from if consistent else found
            end = found + len(content)
            if self.turn_end and full.startswith(self.turn_end, end):
                end += len(self.turn_end)
            spans.append((start, end))
            cursor = end
        return full, spans


def _try_render(render: RenderFn, messages: Sequence[Message]) -> str | None:
    """The generation prompt after ``messages``, or None where the template refuses it."""
    try:
        return render(messages, True)
    except ChatTemplateError:
        return None
