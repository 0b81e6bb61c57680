"""Pruned draft vocabulary: the most frequent target tokens of a fixed sample of the corpus.

On a CPU the target's LM head (49k rows for SmolLM2) costs several times a whole draft layer,
both when drafting and when training, so a draft may predict over ``draft_vocab_size`` tokens
only. ``d2t`` maps draft ids to target ids (sorted ascending, EOS ids always kept so a draft can
end a reply); a target token outside it can never be proposed, only produced by the target.

The counts come from a *vocabulary file* (``save_vocab`` / ``load_vocab``: the assistant-token
counts of a fixed sample, by default the whole training split), not from the training budget,
so every budget of a data sweep gets the same ``d2t`` (a 31k-token budget holds only ~3.8k
distinct assistant tokens). ``DraftConfig.vocab='budget'`` counts the budget instead: how the
drafts of docs/results.md were trained.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scylla.errors import ConfigError, DataError


def token_counts(sequences: Iterable[tuple[Sequence[int], Sequence[int]]], vocab_size: int
                 ) -> torch.Tensor:
    """Counts (V,) of the tokens the draft learns to predict: those under the loss mask
    (every token when a sequence has no mask at all)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in sequences:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        mask_t = torch.as_tensor(mask, dtype=torch.bool)
        chosen = ids_t[mask_t] if bool(mask_t.any()) else ids_t
        counts += torch.bincount(chosen, minlength=vocab_size)
    return counts


def build_d2t(counts: torch.Tensor, draft_vocab_size: int,
              always: Sequence[int] = ()) -> torch.Tensor:
    """(Vd,) target ids of the ``draft_vocab_size`` most frequent tokens, ascending.

    Ties (including the many unseen tokens) go to the lower id, so the map is a pure function
    of the counts. ``always`` (EOS ids) are included whatever their count.
    """
    vocab = counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise ConfigError(f"DraftConfig.draft_vocab_size={draft_vocab_size}: must be in "
                          f"[1, {vocab}] (the target's vocabulary) or 0 for no pruning")
    if len(set(always)) > draft_vocab_size:
        raise ConfigError(f"DraftConfig.draft_vocab_size={draft_vocab_size}: smaller than the "
                          f"{len(set(always))} tokens that must be kept ({list(always)})")
    score = counts.to(torch.float64).clone()
    score[list(always)] = float("inf")
    # stable sort on -score keeps ascending ids among equal scores
    order = torch.sort(-score, stable=True).indices
    return torch.sort(order[:draft_vocab_size]).values


def t2d_of(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) target id -> draft id, -1 for tokens outside the draft vocabulary."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=d2t.device)
    t2d[d2t] = torch.arange(d2t.numel(), device=d2t.device)
    return t2d


@dataclass(frozen=True)
class Vocabulary:
    """Token counts (V,) of a fixed sample, where they come from, and the file's digest."""
    counts: torch.Tensor
    source: str  # e.g. "sharegpt train split, 23,512,004 tokens"
    target: str  # the target's name (its tokenizer's ids)
    digest: str = ""  # sha256 of the file (first 16 hex digits); "" before it is saved

    def record(self) -> dict[str, str]:
        """What a draft's card / spec extra records about its vocabulary."""
        return {"source": self.source, "digest": self.digest}


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def save_vocab(vocab: Vocabulary, path: str | Path) -> Vocabulary:
    """Write the seen tokens' ids and counts (safetensors, a few hundred kB); returns the
    vocabulary with its digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.nonzero(vocab.counts).flatten()
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ids": ids, "counts": vocab.counts[ids].long()}, str(tmp),
              metadata={"source": vocab.source, "target": vocab.target,
                        "vocab_size": str(vocab.counts.numel())})
    tmp.replace(path)
    return Vocabulary(vocab.counts, vocab.source, vocab.target, file_digest(path))


def load_vocab(path: str | Path, target_name: str, vocab_size: int) -> Vocabulary:
    """The vocabulary file at ``path``, checked to be for target ``target_name`` with
    ``vocab_size`` tokens; DataError naming the file when it is unreadable or another's."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ids, counts = f.get_tensor("ids").long(), f.get_tensor("counts").long()
    except (OSError, SafetensorError, KeyError) as e:
        raise DataError(f"vocabulary file {path}: cannot read it ({e}); rebuild it (delete the "
                        "file: `scylla train` writes it again)") from e
    if meta.get("target") != target_name or meta.get("vocab_size") != str(vocab_size):
        raise DataError(f"vocabulary file {path} was built for target {meta.get('target')!r} "
                        f"with {meta.get('vocab_size')} tokens, not {target_name!r} with "
                        f"{vocab_size}")
    if ids.shape != counts.shape or (ids.numel() and not 0 <= int(ids.min())
                                     <= int(ids.max()) < vocab_size):
        raise DataError(f"vocabulary file {path}: ids and counts do not fit a {vocab_size}-token "
                        "vocabulary")
    full = torch.zeros(vocab_size, dtype=torch.long)
    full[ids] = counts
    return Vocabulary(full, meta.get("source", ""), target_name, file_digest(path))
