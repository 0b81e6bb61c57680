"""Benchmark prompts: Spec-Bench, any prompt JSONL, and held-out ShareGPT.

A prompt JSONL line is one of
- Spec-Bench: ``{"question_id", "category", "turns": [str, ...]}``;
- plain: ``{"prompt": str}`` or ``{"text": str}`` (optional ``id``, ``category``);
- a conversation: ``{"conversations"|"messages": [...]}``, whose user messages are the turns.

Spec-Bench ships inside the package (``spec_bench/``, Apache-2.0) and is named ``spec-bench``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scylla.data.chat_tokens import render
from scylla.data.conversations import ROLE_MAP, messages_field, raw_message
from scylla.data.jsonl import read_jsonl
from scylla.data.sharegpt import load_sharegpt
from scylla.data.split import VAL_FRACTION, split_conversations
from scylla.errors import DataError

DEFAULT_CATEGORY = "default"
SHAREGPT_CATEGORY = "sharegpt"
# Held-out ShareGPT openers longer than this (about 500 tokens; a tenth of them are) are
# skipped: pasted documents would make prefill, not decoding, dominate a CPU benchmark.
MAX_PROMPT_CHARS = 2000
# prompt files known by name (see spec_bench/README.md)
NAMED_PROMPTS = {"spec-bench": Path(__file__).with_name("spec_bench") / "question.jsonl"}


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: list[str]  # user turns; decoding uses turns[0], multi-turn benchmarks the rest


def prompt_from_record(obj: dict[str, Any], where: str, default_id: str) -> Prompt:
    """One prompt from a JSONL record; ``where`` ("file:line") names it in errors."""
    if "turns" in obj:
        turns = obj["turns"]
    elif "prompt" in obj or "text" in obj:
        turns = [obj.get("prompt", obj.get("text"))]
    elif isinstance(messages_field(obj), list):
        parsed = [raw_message(m) for m in messages_field(obj)]
        if any(p is None for p in parsed):
            raise DataError(f"{where}: a message is not {{from|role, value|content}}")
        turns = [content for role, content in parsed if ROLE_MAP.get(role.lower()) == "user"]
    else:
        raise DataError(f"{where}: no prompt: expected 'turns', 'prompt', 'text', "
                        f"'conversations' or 'messages' (keys present: {sorted(obj)})")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise DataError(f"{where}: the turns must be a list of strings")
    if not turns or not turns[0].strip():
        raise DataError(f"{where}: empty prompt")
    prompt_id = obj.get("question_id", obj.get("id", default_id))
    return Prompt(id=str(prompt_id), category=str(obj.get("category", DEFAULT_CATEGORY)),
                  turns=list(turns))


def spread_over_categories(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    """``n`` prompts taken round-robin over the categories, returned in their input order.

    Categories take turns in order of first appearance, each giving its next prompt, so 40 of
    Spec-Bench's 13 categories are 4 from the first and 3 from every other. A larger ``n``
    picks a superset of a smaller one.
    """
    if n < 0:
        raise DataError(f"num_prompts={n}: must be >= 0")
    if n > len(prompts):
        raise DataError(f"num_prompts={n}: only {len(prompts)} prompts available")
    queues: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        queues.setdefault(p.category, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues.values():
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth])
        depth += 1
    return [prompts[i] for i in sorted(chosen)]


def prompt_file(source: str | Path) -> Path:
    """The JSONL file of a prompt source: a name of ``NAMED_PROMPTS`` or a path."""
    return NAMED_PROMPTS.get(str(source), Path(source))


def load_prompts(path: str | Path, num_prompts: int | None = None,
                 categories: Iterable[str] | None = None) -> list[Prompt]:
    """Prompts of a JSONL file (or of a named one, ``prompt_file``), optionally only
    ``categories`` and ``num_prompts`` of them spread evenly over the categories (see
    ``spread_over_categories``)."""
    path = prompt_file(path)
    prompts = [prompt_from_record(obj, f"{path}:{lineno}", f"{path.stem}:{lineno}")
               for lineno, obj in read_jsonl(path)]
    if categories is not None:
        wanted = list(categories)
        present = list(dict.fromkeys(p.category for p in prompts))
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise DataError(f"{path}: no prompts of categories {unknown}; it has {present}")
        prompts = [p for p in prompts if p.category in wanted]
    if num_prompts is not None:
        prompts = spread_over_categories(prompts, num_prompts)
    return prompts


def sharegpt_prompts(n: int | None = None, val_fraction: float = VAL_FRACTION,
                     max_chars: int = MAX_PROMPT_CHARS, limit: int | None = None
                     ) -> list[Prompt]:
    """The first user turn of held-out (validation split) ShareGPT conversations, file order.

    Openers longer than ``max_chars`` characters are skipped; ``limit`` parses only that many
    ShareGPT records (tests).
    """
    val = split_conversations(load_sharegpt(limit=limit), "val", val_fraction)
    prompts = [Prompt(id=c.id, category=SHAREGPT_CATEGORY, turns=[c.user_turns()[0]])
               for c in val if len(c.user_turns()[0]) <= max_chars]
    if n is None:
        return prompts
    if n > len(prompts):
        raise DataError(f"num_prompts={n}: only {len(prompts)} held-out ShareGPT prompts "
                        f"(val_fraction={val_fraction}, max_chars={max_chars})")
    return prompts[:n]


def prompts_from(source: str | Path | None, num_prompts: int | None = None,
                 categories: Iterable[str] | None = None) -> list[Prompt]:
    """A prompt JSONL path or name (``spec-bench``), or None / "sharegpt" for the held-out
    ShareGPT default."""
    if source is None or str(source) == SHAREGPT_CATEGORY:
        if categories is not None:
            raise DataError("categories apply to a prompt file; ShareGPT prompts have none")
        return sharegpt_prompts(num_prompts)
    return load_prompts(source, num_prompts, categories)


def prompt_ids(tokenizer: Any, prompt: Prompt | str, turn: int = 0) -> list[int]:
    """Token ids of a prompt's turn as a user message, rendered with the tokenizer's chat
    template and its generation prompt: what the target continues from."""
    text = prompt.turns[turn] if isinstance(prompt, Prompt) else prompt
    if not text.strip():
        where = f"prompt {prompt.id!r}" if isinstance(prompt, Prompt) else "prompt"
        raise DataError(f"{where}: empty text")
    rendered = render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
