"""The two record kinds a corpus may hold, and their validation.

A record is a mapping with either
  - ``text``: a string (plain text, every token is trained on), or
  - ``messages``: a list of ``{"role": str, "content": str}`` with at least one ``assistant``
    message (chat; only assistant turns are trained on), or
  - ``prompt`` and ``response``: strings, read as one user turn and one assistant turn.
Other keys are ignored. Any other shape raises :class:`RecordError` naming where the record came
from (file and line or row) and what was expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A corpus record that is not one of the accepted shapes."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record: exactly one of ``text`` and ``messages`` is set."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def parse_record(raw: Any, where: str) -> Record:
    """Validate ``raw`` (a decoded record) into a :class:`Record`; ``where`` names its origin."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(raw).__name__}")
    if "text" in raw:
        return Record(text=_string(raw["text"], "text", where))
    if "messages" in raw:
        return Record(messages=_messages(raw["messages"], where))
    if "prompt" in raw and "response" in raw:
        prompt = _string(raw["prompt"], "prompt", where)
        response = _string(raw["response"], "response", where)
        return Record(messages=(Message("user", prompt), Message("assistant", response)))
    raise RecordError(
        f"{where}: expected a 'text' field, a 'messages' list or 'prompt' and 'response' fields, "
        f"got keys {sorted(raw)}"
    )


def _string(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise RecordError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
            raise RecordError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = _string(item["role"], f"messages[{i}].role", where)
        if role not in ROLES:
            raise RecordError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        messages.append(Message(role, _string(item["content"], f"messages[{i}].content", where)))
    if not any(m.role == "assistant" for m in messages):
        raise RecordError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    return tuple(messages)
