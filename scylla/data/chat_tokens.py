"""Conversations -> token ids + loss mask, with the tokenizer's own chat template.

The mask is 1 on the tokens of every assistant message and on the end-of-turn marker that
closes it (the model must learn to stop), 0 elsewhere (system, user, role headers). Nothing
about the template is hard-wired; the spans come from the template itself:

- ``P_i`` = render(messages[:i], add_generation_prompt=True): everything up to where the model
  starts writing assistant message i (its role header included);
- ``F_i`` = render(messages[:i+1]): the same conversation with message i written out;
- the assistant's text is the last occurrence of its content (or the content stripped, for
  templates that trim) in ``F_i[len(P_i):]``; what lies between the content and ``len(F_i)``
  is the template's end of turn, of which the tokens up to and including the first special
  token are the marker the model emits to stop (``<|im_end|>``, ``<|eot_id|>``, ...), and the
  rest (a newline the template puts between turns) is left unmasked. A suffix without any
  special token is masked whole.

The full conversation is rendered once and tokenized once with character offsets (a fast
tokenizer is needed); each token is assigned to the span its first character falls in.
This needs a prefix-stable template: each ``F_i`` must be a prefix of the full rendering.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scylla.data.conversations import Message
from scylla.errors import DataError


@dataclass(frozen=True)
class AssistantSpan:
    """Character offsets of one assistant message in the rendered conversation."""

    content_start: int
    content_end: int
    turn_end: int  # end of the template's end-of-turn text after the content


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False
           ) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise DataError(f"chat template of {template_name(tokenizer)} rendered "
                        f"{type(text).__name__}, expected text")
    return text


def template_name(tokenizer: Any) -> str:
    return f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def template_fingerprint(tokenizer: Any) -> str:
    """A short hash of the chat template (part of every tokenized-corpus cache key)."""
    template = tokenizer.chat_template
    if template is None:
        raise DataError(f"{template_name(tokenizer)} has no chat template; set "
                        "tokenizer.chat_template to a jinja template first")
    if isinstance(template, dict):  # several named templates
        template = repr(sorted(template.items()))
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def assistant_spans(tokenizer: Any, messages: Sequence[Message]
                    ) -> tuple[str, list[AssistantSpan]]:
    """The full rendering of ``messages`` and the span of each assistant message in it."""
    template_fingerprint(tokenizer)  # a clear error when there is no template at all
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        written = render(tokenizer, messages[:i + 1])
        if not full.startswith(written):
            raise DataError(
                f"chat template of {template_name(tokenizer)} is not prefix-stable: rendering "
                f"the first {i + 1} messages is not a prefix of rendering all {len(messages)}, "
                "so the assistant tokens cannot be located")
        start = header_end(tokenizer, messages, i, written)
        content = m["content"]
        at = written.rfind(content, start)
        if at < 0 and content.strip():
            content = content.strip()
            at = written.rfind(content, start)
        if at < 0:
            raise DataError(f"chat template of {template_name(tokenizer)} changes the text of "
                            f"assistant message {i}: its content is not in the rendering")
        spans.append(AssistantSpan(at, at + len(content), len(written)))
    return full, spans


def header_end(tokenizer: Any, messages: Sequence[Message], i: int, written: str) -> int:
    """Where the template's text for assistant message ``i`` (after its header) may begin."""
    if i == 0:
        return 0
    prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
    if written.startswith(prompt):
        return len(prompt)
    # The template's generation prompt is not how it writes a past assistant turn: fall back
    # to the end of the preceding messages (the content search then skips the header).
    before = render(tokenizer, messages[:i])
    if written.startswith(before):
        return len(before)
    raise DataError(f"chat template of {template_name(tokenizer)} is not prefix-stable: "
                    f"message {i - 1}'s rendering is not a prefix of message {i}'s")


def special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


def mask_from_offsets(offsets: Sequence[tuple[int, int]], input_ids: Sequence[int],
                      spans: Sequence[AssistantSpan], specials: frozenset[int]) -> list[int]:
    """1 for tokens starting inside an assistant content or its end-of-turn marker."""
    mask = [0] * len(input_ids)
    t = 0
    for span in spans:
        while t < len(offsets) and offsets[t][0] < span.content_start:
            t += 1
        while t < len(offsets) and offsets[t][0] < span.content_end:
            mask[t] = 1
            t += 1
        suffix = []
        while t < len(offsets) and offsets[t][0] < span.turn_end:
            suffix.append(t)
            t += 1
        stop = next((j for j, k in enumerate(suffix) if input_ids[k] in specials),
                    len(suffix) - 1)
        for k in suffix[:stop + 1]:
            mask[k] = 1
    return mask


def tokenize_rendered(tokenizer: Any, rendered: Sequence[tuple[str, list[AssistantSpan]]],
                      max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenize already rendered conversations in one batch call (parallel in Rust)."""
    if not rendered:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{template_name(tokenizer)} gives no character offsets; a fast "
                        "(Rust) tokenizer is needed to derive the loss mask")
    # The template writes any BOS itself; apply_chat_template(tokenize=True) does the same.
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                    return_offsets_mapping=True)
    specials = special_ids(tokenizer)
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        mask = mask_from_offsets(offsets, ids, spans, specials)
        out.append((list(ids[:max_len]), mask[:max_len]))
    return out


def tokenize_conversations(tokenizer: Any, convs: Sequence[Sequence[Message]], max_len: int
                           ) -> list[tuple[list[int], list[int]]]:
    """``tokenize_conversation`` for many conversations at once."""
    if max_len < 1:
        raise DataError(f"max_len={max_len}: must be >= 1")
    return tokenize_rendered(tokenizer, [assistant_spans(tokenizer, list(c)) for c in convs],
                             max_len)


def tokenize_conversation(tokenizer: Any, conv: Sequence[Message], max_len: int
                          ) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of one conversation, both cut to ``max_len`` tokens.

    ``input_ids`` equal ``tokenizer.apply_chat_template(conv, tokenize=True)`` (cut); the mask
    is 1 on assistant tokens and their end-of-turn marker (see the module docstring).
    """
    return tokenize_conversations(tokenizer, [conv], max_len)[0]
