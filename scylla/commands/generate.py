"""``scylla generate``: answer a prompt or continue a chat with a target (and a draft), streaming
the text as the target accepts it, then print the run's τ and tokens/s.

    scylla generate --draft runs/draft-2l --prompt "Explain KV caches in two sentences."
    scylla generate --chat chat.json --method pld          # no draft: prompt lookup
    scylla generate --draft runs/draft-2l --interactive    # one user message per line
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scylla.commands.cli import add_dataclass_args, dataclass_from_args
from scylla.config import DecodeConfig, TargetSpec
from scylla.decoding.methods import DRAFTED, SPECULATIVE, speculative
from scylla.decoding.plain import run_plain
from scylla.decoding.result import DecodeResult
from scylla.drafts.io import DEFAULT, from_pretrained, is_shipped
from scylla.errors import DataError
from scylla.modeling.targets import TargetInfo, load_target

ROLES = ("system", "user", "assistant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TargetSpec)
    add_dataclass_args(parser, DecodeConfig, skip=("method", "decode_batch_size"))
    parser.add_argument("--method", choices=("plain",) + SPECULATIVE, default=None,
                        help="Decoding method (default: hybrid with a draft, else pld).")
    parser.add_argument("--draft", help="Draft checkpoint directory (written by scylla train), "
                        f"or '{DEFAULT}'; default: the draft shipped for the target, if any.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="One user message.")
    source.add_argument("--chat", help="JSON file with a list of {role, content} messages; the "
                                       "reply continues it as the assistant.")
    source.add_argument("--interactive", action="store_true",
                        help="Chat on stdin: one user message per line, empty line to stop.")
    parser.add_argument("--system", help="A system message put before the conversation.")
    parser.add_argument("--raw", action="store_true",
                        help="Tokenize --prompt as plain text, without the chat template.")


def read_chat(path: str) -> list[dict[str, str]]:
    try:
        messages = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--chat {path}: cannot read a JSON list of messages: {e}") from e
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise DataError(f"--chat {path}: expected a non-empty JSON list of "
                        f'{{"role": one of {ROLES}, "content": "..."}} objects')
    return messages


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the target's tokenizer has no chat template; use --prompt with --raw")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


class Streamer:
    """Prints the decoded text of a growing token list as it grows. Text ending in an
    incomplete multi-byte character (U+FFFD) waits for the next tokens."""

    def __init__(self, tokenizer: Any, out: Any = sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, prompt_index: int, new: list[int]) -> None:
        self.tokens += new
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


def summary(res: DecodeResult, method: str) -> str:
    s = res.seconds
    tps = res.new_tokens / max(s["total"], 1e-9)
    split = ", ".join(f"{k} {s[k]:.2f}s" for k in ("draft", "verify", "other") if k in s)
    return (f"[{method}] τ={res.tau:.2f}  {res.new_tokens} tokens, {res.target_forwards} target "
            f"forwards, {s['total']:.2f}s = {tps:.1f} tokens/s ({split})")


def reply(target: Any, ids: list[int], cfg: DecodeConfig, draft: Any) -> str:
    streamer = Streamer(target.tokenizer)
    if cfg.method == "plain":  # plain decoding has no streaming hook: print when done
        res = run_plain(target, [ids], cfg)
        streamer(0, res.tokens[0])
    else:
        res = speculative(target, [ids], cfg, draft, on_emit=streamer)
    print(file=sys.stdout, flush=True)
    print(summary(res, cfg.method), file=sys.stderr, flush=True)
    return streamer.text


def run(args: argparse.Namespace) -> int:
    target = load_target(dataclass_from_args(TargetSpec, args))
    draft_path = args.draft
    if draft_path is None and args.method in (None, *DRAFTED) \
            and is_shipped(TargetInfo.of(target).name):
        draft_path = DEFAULT  # the draft shipped for this target
    draft = from_pretrained(draft_path, target) if draft_path else None
    method = args.method or ("hybrid" if draft is not None else "pld")
    cfg = dataclass_from_args(DecodeConfig, argparse.Namespace(**{**vars(args),
                                                                  "method": method}))
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        if args.raw:
            ids = target.tokenizer(args.prompt)["input_ids"]
        else:
            ids = chat_ids(target.tokenizer, system + [{"role": "user", "content": args.prompt}])
        if not ids:
            raise DataError("--prompt is empty")
        reply(target, ids, cfg, draft)
        return 0
    if args.chat is not None:
        reply(target, chat_ids(target.tokenizer, system + read_chat(args.chat)), cfg, draft)
        return 0
    messages = list(system)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        text = reply(target, chat_ids(target.tokenizer, messages), cfg, draft)
        messages.append({"role": "assistant", "content": text})
