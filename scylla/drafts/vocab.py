"""Pruned draft vocabulary: the most frequent target tokens of the training data.

On a CPU the target's LM head (49k rows for SmolLM2) costs several times a whole draft layer,
both when drafting and when training, so a draft may predict over ``draft_vocab_size`` tokens
only. ``d2t`` maps draft ids to target ids (sorted ascending, EOS ids always kept so a draft can
end a reply); a target token outside it can never be proposed, only produced by the target.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from scylla.errors import ConfigError


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
