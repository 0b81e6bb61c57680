"""Hidden-state shards: the frozen target's features over the corpus, on disk, with a manifest.

A shard directory holds ``shard-00000.safetensors, shard-00001.safetensors, ...`` and
``manifest.json``. Sequences are stored flat (no padding) in the fixed shuffled training order:

- ``input_ids`` (N,) int32 and ``loss_mask`` (N,) uint8: the tokenized sequences, concatenated
- ``offsets`` (S+1,) int64: sequence s is rows ``offsets[s]:offsets[s+1]``
- ``last_hidden`` (N, H): the target's top feature AFTER the final norm (EAGLE's feature)
- ``hidden.<i>`` (N, H) for each i in ``layers`` (HF hidden_states indices, EAGLE-3's fused
  low/mid/high layers), when the build asked for them
- ``target_argmax`` (N,) int32 in validation shards: the target's greedy next token

The manifest holds the build header (target, corpus, layers, dtype, ...) and per shard its file,
sequence lengths, tokens, cumulative tokens and sha256. Shards are written to a temporary name
and renamed, then the manifest is replaced atomically, so a killed build leaves a consistent
directory and continues after its last complete shard. Every shard is checked against its sha256
before use: a corrupt or missing shard raises DataError naming the file, never silently used.

Disk: features are stored in bf16 by default. 576 dims x 2 bytes = 1.15 kB per token for
SmolLM2-135M, i.e. about 2.3 GB per 2M tokens (x4 with EAGLE-3's three extra layers).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scylla.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "scylla-hidden-states/1"


@dataclass
class ShardInfo:
    file: str
    lengths: list[int]  # tokens of each sequence, in order
    cum_tokens: int  # tokens in this shard and all before it
    sha256: str

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class Manifest:
    """What a shard directory holds. ``header`` identifies the build; a resumed or extended build
    must ask for the same header."""

    header: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False  # the corpus was exhausted: no budget can grow this directory

    @property
    def total_tokens(self) -> int:
        return self.shards[-1].cum_tokens if self.shards else 0

    @property
    def total_sequences(self) -> int:
        return sum(len(s.lengths) for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "header": self.header, "complete": self.complete,
                "total_tokens": self.total_tokens, "total_sequences": self.total_sequences,
                "shards": [{**asdict(s), "tokens": s.tokens} for s in self.shards]}

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: Path) -> "Manifest":
        if obj.get("format") != FORMAT:
            raise DataError(f"{path}: not a scylla hidden-state manifest (format "
                            f"{obj.get('format')!r}, expected {FORMAT!r})")
        shards = [ShardInfo(file=s["file"], lengths=list(s["lengths"]),
                            cum_tokens=int(s["cum_tokens"]), sha256=s["sha256"])
                  for s in obj["shards"]]
        return cls(header=obj["header"], shards=shards, complete=bool(obj["complete"]))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no hidden-state manifest here; build one with "
                        "`scylla hidden-states`")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt manifest ({e.msg} at line {e.lineno})") from e
    return Manifest.from_json(obj, path)


def save_manifest(directory: str | Path, manifest: Manifest) -> None:
    write_atomic(Path(directory) / MANIFEST,
                 json.dumps(manifest.to_json(), indent=1).encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor],
                cum_before: int) -> ShardInfo:
    """Write shard ``index`` atomically (tmp + rename) and describe it for the manifest."""
    path = directory / shard_name(index)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    data = tmp.read_bytes()
    os.replace(tmp, path)
    offsets = tensors["offsets"].tolist()
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    return ShardInfo(file=path.name, lengths=lengths, cum_tokens=cum_before + sum(lengths),
                     sha256=sha256_bytes(data))


def verify_shard(directory: str | Path, info: ShardInfo) -> Path:
    """The shard's path, after checking it exists and matches its recorded sha256."""
    path = Path(directory) / info.file
    if not path.is_file():
        raise DataError(f"hidden-state shard {path} is missing (listed in {MANIFEST}); rebuild "
                        "with `scylla hidden-states` (it resumes after the last good shard)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if h.hexdigest() != info.sha256:
        raise DataError(f"hidden-state shard {path} is corrupt (sha256 {h.hexdigest()[:12]}... "
                        f"!= recorded {info.sha256[:12]}...); delete it and everything after it "
                        f"from {MANIFEST}, or rebuild the directory")
    return path


def budget_prefix(manifest: Manifest, train_tokens: int) -> tuple[int, int]:
    """(sequences, tokens) of the shortest prefix of the order reaching ``train_tokens``.

    Smaller budgets are therefore prefixes of larger ones. When the directory holds fewer
    tokens, the whole directory is the prefix (the caller decides whether that is an error).
    """
    cums = [s.cum_tokens for s in manifest.shards]
    k = bisect.bisect_left(cums, train_tokens)  # first shard whose end reaches the budget
    if k == len(cums):
        return manifest.total_sequences, manifest.total_tokens
    before_seqs = sum(len(s.lengths) for s in manifest.shards[:k])
    tokens = cums[k - 1] if k else 0
    for j, n in enumerate(manifest.shards[k].lengths):
        tokens += n
        if tokens >= train_tokens:
            return before_seqs + j + 1, tokens
    raise AssertionError("cum_tokens disagree with the shard's sequence lengths")


class ShardReader:
    """Random access to the sequences of a shard directory (memory-mapped, checked once).

    ``reader[s]`` is a dict of tensors for sequence s of the order: ``input_ids`` (T,),
    ``loss_mask`` (T,), ``last_hidden`` (T, H) and ``hidden.<i>`` (T, H) for stored layers.
    Only the first ``num_sequences`` sequences are visible (a data budget's prefix).
    """

    def __init__(self, directory: str | Path, num_sequences: int | None = None,
                 verify: bool = True):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        total = self.manifest.total_sequences
        self.num_sequences = total if num_sequences is None else min(num_sequences, total)
        self._starts: list[int] = []  # first sequence index of each shard
        n = 0
        for info in self.manifest.shards:
            self._starts.append(n)
            n += len(info.lengths)
        self._shards_used = bisect.bisect_left(self._starts, self.num_sequences)
        if verify:
            for info in self.manifest.shards[:self._shards_used]:
                verify_shard(self.directory, info)
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_sequences

    def lengths(self) -> list[int]:
        out = [n for info in self.manifest.shards for n in info.lengths]
        return out[:self.num_sequences]

    def _open(self, k: int) -> Any:
        if k not in self._handles:
            path = self.directory / self.manifest.shards[k].file
            try:
                handle = safe_open(str(path), framework="pt")
                self._offsets[k] = handle.get_tensor("offsets").tolist()
            except (SafetensorError, OSError) as e:
                raise DataError(f"hidden-state shard {path} cannot be read: {e}") from e
            self._handles[k] = handle
        return self._handles[k]

    def get(self, s: int, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of sequence ``s`` (all stored ones, or only ``names``)."""
        if not 0 <= s < self.num_sequences:
            raise IndexError(s)
        k = bisect.bisect_right(self._starts, s) - 1
        handle = self._open(k)
        j = s - self._starts[k]
        a, b = self._offsets[k][j], self._offsets[k][j + 1]
        names = names or tuple(n for n in handle.keys() if n != "offsets")
        return {name: handle.get_slice(name)[a:b] for name in names}

    def __getitem__(self, s: int) -> dict[str, torch.Tensor]:
        return self.get(s)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers / spawned processes reopen the memory maps themselves
        return {**self.__dict__, "_handles": {}, "_offsets": {}}
