"""Deterministic train / validation split by a stable hash of an id.

An id is in validation when the first 8 bytes of sha256(id), read as a fraction of 2**64,
fall below ``val_fraction``. That depends on nothing but the id (unlike Python's ``hash()``,
which is salted per process), so every run on every machine agrees, adding or removing other
conversations never moves one, and a larger fraction holds every id of a smaller one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from scylla.data.conversations import Conversation
from scylla.errors import DataError

# 5% of ShareGPT is ~870 conversations: ample held-out prompts and validation tokens while
# costing the training budgets (at most a few million tokens on a CPU) nothing.
VAL_FRACTION = 0.05
SPLITS = ("train", "val")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(key: str, val_fraction: float = VAL_FRACTION) -> bool:
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction={val_fraction!r}: must be in [0, 1]")
    return stable_fraction(key) < val_fraction


def split_ids(ids: Iterable[str], val_fraction: float = VAL_FRACTION
              ) -> tuple[list[str], list[str]]:
    """``(train ids, validation ids)``, each in the input order."""
    train, val = [], []
    for i in ids:
        (val if is_validation(i, val_fraction) else train).append(i)
    return train, val


def split_conversations(convs: Sequence[Conversation], split: str,
                        val_fraction: float = VAL_FRACTION) -> list[Conversation]:
    """The conversations of ``split`` ("train" or "val"), decided by their group's hash."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}: must be one of {SPLITS}")
    want_val = split == "val"
    return [c for c in convs if is_validation(c.group, val_fraction) == want_val]
