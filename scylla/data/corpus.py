"""Tokenized training corpora: a fixed shuffled order, token budgets as prefixes, a disk cache.

A ``TokenizedCorpus`` holds the conversations of one split in a fixed order (train: shuffled
with ``shuffle_seed``; val: file order). A data budget ``train_tokens=N`` is the shortest
prefix of that order holding at least N tokens, so a smaller budget is always a subset of a
larger one and the data axis is not confounded by resampling. Tokens are counted over whole
(truncated) sequences, the unit the target runs over when hidden states are built.

Tokenizing all of ShareGPT takes a while on two cores, so the order is cut into chunks of
``chunk_size`` conversations, tokenized only when a budget reaches them and cached as
``.npz`` files under ``paths.data_dir()/corpora/tokenized/<tokenizer>-L<max_len>-<key>/``.
The key hashes the tokenizer (vocabulary and chat template), ``max_len``, the order and the
conversations' text, so any change gives a fresh cache. Conversations left without any
assistant token by the ``max_len`` cut are skipped (no loss to train on) and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from scylla import paths
from scylla.data.chat_tokens import (
    assistant_spans,
    template_fingerprint,
    tokenize_rendered,
)
from scylla.data.conversations import Conversation
from scylla.data.sharegpt import load_sharegpt
from scylla.data.split import VAL_FRACTION, split_conversations
from scylla.errors import DataError

FORMAT_VERSION = 1
# ~256 ShareGPT conversations are ~0.35M tokens, a few seconds of tokenizing: a killed build
# loses little, a small budget tokenizes little, and the files stay few (~70 for ShareGPT).
CHUNK_CONVERSATIONS = 256


@dataclass(frozen=True)
class TokenizedExample:
    conv_id: str
    input_ids: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (T,) uint8, 1 on assistant tokens


@dataclass(frozen=True)
class Chunk:
    examples: list[TokenizedExample]
    skipped: int  # conversations without any assistant token after the max_len cut


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(vocab.encode("utf-8"))
    h.update(template_fingerprint(tokenizer).encode())
    return h.hexdigest()


def conversations_fingerprint(convs: Sequence[Conversation]) -> str:
    h = hashlib.sha256()
    for c in convs:
        h.update(c.id.encode("utf-8") + b"\0")
        for m in c:
            h.update(m["role"].encode() + b"\0" + m["content"].encode("utf-8") + b"\0")
        h.update(b"\1")
    return h.hexdigest()


class TokenizedCorpus:
    """Conversations in a fixed order, tokenized lazily chunk by chunk and cached on disk."""

    def __init__(self, tokenizer: Any, conversations: Sequence[Conversation], max_len: int,
                 shuffle_seed: int | None = 0, chunk_size: int = CHUNK_CONVERSATIONS,
                 cache_root: Path | None = None, progress: bool = True) -> None:
        if max_len < 2:
            raise DataError(f"max_len={max_len}: must be >= 2")
        if chunk_size < 1:
            raise DataError(f"chunk_size={chunk_size}: must be >= 1")
        if not conversations:
            raise DataError("no conversations to tokenize")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.chunk_size = chunk_size
        self.progress = progress
        order = (np.arange(len(conversations)) if shuffle_seed is None else
                 np.random.default_rng(shuffle_seed).permutation(len(conversations)))
        self.conversations = [conversations[i] for i in order]
        key = hashlib.sha256(json.dumps({
            "format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_len": max_len, "chunk_size": chunk_size,
            "conversations": conversations_fingerprint(self.conversations)}).encode())
        name = re.sub(r"[^A-Za-z0-9._-]+", "_",
                      Path(getattr(tokenizer, "name_or_path", "") or "tokenizer").name)
        root = cache_root if cache_root is not None else paths.data_dir() / "corpora" / "tokenized"
        self.dir = Path(root) / f"{name}-L{max_len}-{key.hexdigest()[:16]}"
        self._tokens_built = 0  # by this process, for the progress bar

    def __repr__(self) -> str:
        return (f"TokenizedCorpus({len(self.conversations)} conversations, "
                f"max_len={self.max_len}, cache={self.dir})")

    @property
    def num_chunks(self) -> int:
        return -(-len(self.conversations) // self.chunk_size)

    def chunk_path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:05d}.npz"

    def is_cached(self, k: int) -> bool:
        return self.chunk_path(k).is_file()

    def chunk(self, k: int, bar: Any = None) -> Chunk:
        """Chunk ``k`` of the order: from the disk cache, or tokenized (and cached) now.

        Chunks are not kept in memory: iterating the whole corpus holds one at a time.
        """
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"chunk {k} out of range 0..{self.num_chunks - 1}")
        return self._read(k) if self.is_cached(k) else self._build(k, bar)

    def _read(self, k: int) -> Chunk:
        path = self.chunk_path(k)
        try:
            with np.load(path) as z:
                ids, mask, lengths = z["input_ids"], z["loss_mask"], z["lengths"]
                conv_ids, skipped = [str(s) for s in z["conv_ids"]], int(z["skipped"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: corrupt tokenized chunk ({e}); delete it to rebuild") from e
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        if bounds[-1] != len(ids) or len(ids) != len(mask) or len(conv_ids) != len(lengths):
            raise DataError(f"{path}: corrupt tokenized chunk (sizes disagree); delete it "
                            "to rebuild")
        return Chunk([TokenizedExample(c, ids[a:b], mask[a:b])
                      for c, a, b in zip(conv_ids, bounds[:-1], bounds[1:])], skipped)

    def _build(self, k: int, bar: Any) -> Chunk:
        convs = self.conversations[k * self.chunk_size:(k + 1) * self.chunk_size]
        rendered = [assistant_spans(self.tokenizer, list(c)) for c in convs]
        examples, skipped = [], 0
        for c, (ids, mask) in zip(convs, tokenize_rendered(self.tokenizer, rendered,
                                                            self.max_len)):
            if not any(mask):
                skipped += 1
                continue
            examples.append(TokenizedExample(c.id, np.asarray(ids, dtype=np.int32),
                                             np.asarray(mask, dtype=np.uint8)))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.chunk_path(k)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        empty = np.zeros(0, dtype=np.int32)
        np.savez(tmp,
                 input_ids=np.concatenate([e.input_ids for e in examples] or [empty]),
                 loss_mask=np.concatenate([e.loss_mask for e in examples]
                                          or [empty.astype(np.uint8)]),
                 lengths=np.asarray([len(e.input_ids) for e in examples], dtype=np.int32),
                 conv_ids=np.asarray([e.conv_id for e in examples], dtype=str),
                 skipped=np.asarray(skipped))
        tmp.rename(path)  # atomic: a killed build resumes at the first chunk not on disk
        self._tokens_built += sum(len(e.input_ids) for e in examples)
        if bar is not None:
            bar.update(len(convs))
            bar.set_postfix(tokens=self._tokens_built, refresh=False)
        return Chunk(examples, skipped)

    def _bar(self, first: int) -> Any:
        """A progress bar over the conversations still to tokenize (None when all cached)."""
        todo = [k for k in range(first, self.num_chunks) if not self.is_cached(k)]
        if not todo or not self.progress:
            return None
        return tqdm(total=len(self.conversations), initial=first * self.chunk_size,
                    unit="conv", desc=f"tokenizing {self.dir.name}")

    def examples(self, train_tokens: int | None = None) -> Iterator[TokenizedExample]:
        """Examples in the fixed order; with ``train_tokens``, the shortest prefix reaching it
        (DataError when the whole corpus holds fewer tokens)."""
        if train_tokens is not None and train_tokens < 1:
            raise DataError(f"train_tokens={train_tokens}: must be >= 1")
        total = 0
        bar = None
        try:
            for k in range(self.num_chunks):
                if bar is None and not self.is_cached(k):
                    bar = self._bar(k)
                for ex in self.chunk(k, bar).examples:
                    yield ex
                    total += len(ex.input_ids)
                    if train_tokens is not None and total >= train_tokens:
                        return
        finally:
            if bar is not None:
                bar.close()
        if train_tokens is not None:
            raise DataError(f"train_tokens={train_tokens} exceeds the {total} tokens of "
                            f"{self!r}")

    def take_tokens(self, train_tokens: int) -> list[TokenizedExample]:
        """The shortest prefix of the order holding at least ``train_tokens`` tokens."""
        return list(self.examples(train_tokens))

    def build(self) -> TokenizedCorpus:
        """Tokenize (or check the cache of) every chunk; returns self."""
        for _ in self.examples():
            pass
        return self

    def cumulative_tokens(self) -> np.ndarray:
        """(N,) int64: tokens in the first i+1 examples of the order (builds everything)."""
        lengths = [len(e.input_ids) for e in self.examples()]
        return np.cumsum(np.asarray(lengths, dtype=np.int64))

    def stats(self) -> dict[str, int]:
        """Counts over the whole corpus (builds everything)."""
        self.build()
        out = {"conversations": 0, "skipped": 0, "tokens": 0, "loss_tokens": 0}
        for k in range(self.num_chunks):
            c = self.chunk(k)
            out["conversations"] += len(c.examples)
            out["skipped"] += c.skipped
            out["tokens"] += sum(len(e.input_ids) for e in c.examples)
            out["loss_tokens"] += sum(int(e.loss_mask.sum()) for e in c.examples)
        return out


def load_corpus(tokenizer: Any, max_len: int, split: str = "train",
                conversations: Sequence[Conversation] | None = None,
                val_fraction: float = VAL_FRACTION, shuffle_seed: int = 0,
                progress: bool = True) -> TokenizedCorpus:
    """The tokenized ``split`` of ``conversations`` (default: all of ShareGPT).

    The train split is shuffled with ``shuffle_seed`` (keep it fixed across a sweep: budgets
    are prefixes of this order); the val split keeps file order.
    """
    convs = load_sharegpt() if conversations is None else conversations
    chosen = split_conversations(convs, split, val_fraction)
    if not chosen:
        raise DataError(f"split {split!r} of {len(convs)} conversations is empty "
                        f"(val_fraction={val_fraction})")
    return TokenizedCorpus(tokenizer, chosen, max_len,
                           shuffle_seed=shuffle_seed if split == "train" else None,
                           progress=progress)
