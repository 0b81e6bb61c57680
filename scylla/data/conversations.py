"""Conversations: the unit of chat data, normalised from ShareGPT-style and OpenAI-style records.

A conversation is a sequence of messages ``{"role": "user"|"assistant"|"system", "content": str}``
(so it can be passed straight to ``tokenizer.apply_chat_template``) with an id.

Normalisation rule (``clean_messages``), the same for ShareGPT and user files:
1. Roles are mapped: human/user -> user; gpt/chatgpt/bing/bard/assistant -> assistant;
   system -> system. Any other role, or a message that is not ``{role, content: str}``,
   makes the record invalid.
2. One system message is kept if it comes first.
3. Leading assistant messages are dropped: ShareGPT cut long chats into chunks (ids ``X_0``,
   ``X_1``, ...) and a later chunk often opens with the reply to a question that is in the
   previous chunk.
4. From there the longest prefix alternating user, assistant, user, ... with non-blank
   contents is kept (a second system message, two turns of the same role or a blank message
   ends it), and a trailing user message without a reply is dropped.
5. What has no user -> assistant exchange left is dropped.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scylla.data.jsonl import read_jsonl
from scylla.errors import DataError

Message = dict[str, str]

ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Conversation(Sequence):
    """A cleaned conversation; indexing and iteration give its messages."""

    id: str
    messages: tuple[Message, ...]
    # Conversations of one group always land in the same train/validation split. ShareGPT's
    # chunks of one long chat share a group, so the validation set never sees a chat whose
    # other half is in training. Empty means the id itself.
    group: str = field(default="")

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.id)

    def __getitem__(self, i):  # type: ignore[override]
        return self.messages[i]

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "messages": list(self.messages)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Conversation:
        return cls(id=obj["id"], messages=tuple(obj["messages"]), group=obj.get("group", ""))


def raw_message(m: Any) -> tuple[str, str] | None:
    """``(role as written, content)`` of a ShareGPT- or OpenAI-style message, None if neither."""
    if not isinstance(m, dict):
        return None
    role = m.get("from", m.get("role"))
    content = m.get("value", m.get("content"))
    if not isinstance(role, str) or not isinstance(content, str):
        return None
    return role, content


def clean_messages(raw: Iterable[Any]) -> tuple[list[Message], str | None]:
    """Apply the module's normalisation rule: ``(messages, None)`` or ``([], drop reason)``."""
    mapped: list[Message] = []
    for m in raw:
        parsed = raw_message(m)
        if parsed is None:
            return [], "malformed message"
        role, content = parsed
        if role.lower() not in ROLE_MAP:
            return [], f"unknown role {role!r}"
        mapped.append({"role": ROLE_MAP[role.lower()], "content": content})
    if not mapped:
        return [], "no messages"
    out: list[Message] = []
    rest = mapped
    if rest[0]["role"] == "system":
        if rest[0]["content"].strip():
            out.append(rest[0])
        rest = rest[1:]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    expected = "user"
    for m in rest:
        if m["role"] != expected or not m["content"].strip():
            break
        out.append(m)
        expected = "assistant" if expected == "user" else "user"
    if out and out[-1]["role"] == "user":
        out.pop()
    if not any(m["role"] == "assistant" for m in out):
        return [], "no user->assistant exchange"
    return out, None


def messages_field(obj: dict[str, Any]) -> Any:
    """The message list of a record: ``conversations`` (ShareGPT) or ``messages`` (OpenAI)."""
    return obj.get("conversations", obj.get("messages"))


def conversations_from_records(records: Iterable[tuple[str, Any, str]],
                               dropped: collections.Counter | None = None) -> list[Conversation]:
    """Clean ``(id, raw messages, group)`` records; count drop reasons in ``dropped``.

    A repeated id after cleaning is dropped too (ShareGPT holds some ids twice, once empty).
    """
    dropped = collections.Counter() if dropped is None else dropped
    seen: set[str] = set()
    out = []
    for conv_id, raw, group in records:
        messages, reason = clean_messages(raw)
        if reason is None and conv_id in seen:
            reason = "duplicate id"
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(conv_id)
        out.append(Conversation(id=conv_id, messages=tuple(messages), group=group))
    return out


def load_conversations(path: str | Path,
                       dropped: collections.Counter | None = None) -> list[Conversation]:
    """Conversations from a JSONL file of ``{"conversations"|"messages": [...]}`` lines.

    Messages use ``from``/``value`` (ShareGPT) or ``role``/``content`` (OpenAI). The id is the
    record's ``id`` field, else ``<file stem>:<line>``. Records the normalisation rule rejects
    are counted in ``dropped``; a line without a message list is a DataError naming the line.
    """
    path = Path(path)

    def records() -> Iterator[tuple[str, Any, str]]:
        for lineno, obj in read_jsonl(path):
            raw = messages_field(obj)
            if not isinstance(raw, list):
                raise DataError(f"{path}:{lineno}: expected a list under 'conversations' or "
                                f"'messages' (keys present: {sorted(obj)})")
            yield str(obj.get("id", f"{path.stem}:{lineno}")), raw, ""

    convs = conversations_from_records(records(), dropped)
    if not convs:
        raise DataError(f"{path}: no usable conversation (each needs a user message followed by "
                        "an assistant reply)")
    return convs
