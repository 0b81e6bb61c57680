"""Draft-model proposals: the draft's own cache, its prefill, tree growth and catch-up.

Invariant between steps: the draft cache holds as many entries as the target cache (L), its last
entry consumed the root (the last emitted token) with the target feature before it, and
``root`` holds that entry's prediction. After verification the draft cache is cut back to L
(the tree entries were computed from the draft's own features) and the accepted path is
re-fed with the target's features at the kept nodes (the catch-up forward): tokens
x_{L+1} .. x_{L+a+1} (accepted drafts + the bonus) at draft positions L .. L+a, each with the
target feature of the node before it. Its last output is the next step's root prediction.
"""
from __future__ import annotations

from typing import Any

import torch

from scylla.decoding.expand import DraftRoot, TreeShape, expand
from scylla.decoding.prefill import Prefill
from scylla.decoding.rows import put_cache_rows
from scylla.decoding.tree import Candidates, Tree
from scylla.decoding.verify import Verdict


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, K, F), idx (B, M) -> (B, M, F)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class DraftProposer:
    """Chain, static-tree and dynamic-tree drafting with an EAGLE-style draft model."""

    def __init__(self, draft: Any, shape: TreeShape, temperature: float, top_p: float,
                 vocab: int):
        self.draft = draft
        self.temperature, self.top_p, self.vocab = temperature, top_p, vocab
        self.hidden_layers = tuple(draft.feature_layers)
        self.prefill_forwards = 1
        self.plain = False
        self.set_shape(shape)

    def set_shape(self, shape: TreeShape) -> None:
        """The tree of the next steps (the planner may change it during a decode)."""
        self.shape = shape
        # cache room one step needs beyond the context: the verified tree, the expansion's
        # window plus its last feed, or the catch-up (depth + 1 tokens)
        self.room = max(shape.total + 1, shape.fed_tokens, shape.depth + 1)
        self.forwards_per_step = 1 + len(shape.frontier)  # catch-up + expansion feeds

    def start(self, pre: Prefill) -> "DraftState":
        """The draft's prefill: position t gets prompt token t+1 (the first new token at the
        last position) and the target's feature at t."""
        batch = pre.ids.shape[0]
        lengths = pre.lengths
        rows = torch.arange(batch, device=lengths.device)
        shifted = torch.cat([pre.ids[:, 1:], pre.ids[:, :1]], 1)  # (B, T) x_{t+1} at t
        shifted[rows, lengths - 1] = pre.first
        feats = self.draft.features(pre.target_out)  # (B, T, F)
        cache = self.draft.new_cache(batch, pre.max_len)
        out = self.draft(shifted, feats, cache=cache, compute_logits=False)
        cache.set_lengths(lengths)
        return DraftState(self, cache, self.root_at(out.hidden, lengths - 1))

    def root_at(self, hidden: torch.Tensor, last: torch.Tensor) -> DraftRoot:
        """The root prediction from hidden (B, K, H) at column last[b] of each row: the LM
        head runs on that one position only (on a CPU it costs more than a draft layer)."""
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return DraftRoot(self.draft.readout(h[:, None])[:, 0], h)


class DraftState:
    """The draft side of one batch: its cache and each row's root prediction."""

    def __init__(self, proposer: DraftProposer, cache: Any, root: DraftRoot):
        self.p, self.cache, self.root = proposer, cache, root

    def propose(self, roots: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None) -> tuple[Tree, Candidates | None]:
        p = self.p
        tree, cands, _ = expand(p.draft, self.cache, self.root, roots, lengths, p.shape,
                                p.temperature, p.top_p, p.vocab, generator)
        return tree, cands

    def commit(self, verdict: Verdict, target_out: Any, lengths: torch.Tensor,
               emitted: list[list[int]]) -> None:
        feats = _gather_rows(self.p.draft.features(target_out), verdict.keep_idx)
        # at draft positions L, L+1, ..; padding past a row's count is cut off again below
        out = self.p.draft(verdict.tokens, feats, cache=self.cache, compute_logits=False)
        self.cache.set_lengths(lengths + verdict.count)
        self.root = self.p.root_at(out.hidden, verdict.count - 1)

    def select(self, rows: torch.Tensor) -> "DraftState":
        return DraftState(self.p, self.cache.select(rows),
                          DraftRoot(self.root.logits[rows], self.root.hidden[rows]))

    def put(self, rows: torch.Tensor, other: "DraftState") -> None:
        put_cache_rows(self.cache, rows, other.cache)
        self.root.logits[rows] = other.root.logits
        self.root.hidden[rows] = other.root.hidden
