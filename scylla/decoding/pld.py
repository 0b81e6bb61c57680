"""Prompt-lookup drafting: propose what followed the latest earlier occurrence of the context's
last n-gram (n = pld_ngram down to 1). No draft model; a cheap baseline that shines when the
output copies from the prompt (summaries, RAG, code edits).
"""
from __future__ import annotations

from typing import Any

import torch

from scylla.decoding.prefill import Prefill
from scylla.decoding.tree import Candidates, Tree, chain
from scylla.decoding.verify import Verdict


class NgramIndex:
    """One row's context with, per n-gram, where its latest earlier occurrence continues."""

    def __init__(self, tokens: list[int], max_n: int):
        self.tokens: list[int] = []
        self.max_n = max_n
        self.next_at: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n)]
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        for t in new:
            m = len(self.tokens)
            # the n-grams ending just before position m continue at m
            for n in range(1, min(self.max_n, m) + 1):
                self.next_at[n - 1][tuple(self.tokens[m - n:m])] = m
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest matching suffix n-gram ([] if none)."""
        return self.match(k)[0]

    def match(self, k: int) -> tuple[list[int], int]:
        """``propose(k)`` and the length n of the n-gram it matched (0: no match)."""
        m = len(self.tokens)
        for n in range(min(self.max_n, m), 0, -1):
            at = self.next_at[n - 1].get(tuple(self.tokens[m - n:]))
            if at is not None:
                return self.tokens[at:at + k], n
        return [], 0


class PldProposer:
    hidden_layers: tuple[int, ...] = ()
    forwards_per_step = 0
    prefill_forwards = 0
    plain = False

    def __init__(self, ngram: int, draft_len: int, temperature: float):
        self.ngram, self.draft_len, self.temperature = ngram, draft_len, temperature
        self.room = draft_len + 1

    def start(self, pre: Prefill) -> "PldState":
        return PldState(self, [NgramIndex(p + [f], self.ngram)
                               for p, f in zip(pre.prompts, pre.first.tolist())])


class PldState:
    def __init__(self, proposer: PldProposer, rows: list[NgramIndex]):
        self.p, self.rows = proposer, rows

    def propose(self, roots: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None) -> tuple[Tree, Candidates | None]:
        drafts = [r.propose(self.p.draft_len) for r in self.rows]
        width = max(len(d) for d in drafts)
        tokens = torch.tensor([[0] + d + [0] * (width - len(d)) for d in drafts],
                              device=roots.device)
        tokens[:, 0] = roots
        tree = chain(tokens, torch.tensor([len(d) for d in drafts], device=roots.device))
        if self.p.temperature == 0:
            return tree, None
        # each node's single candidate is the next chain node, proposed with probability 1
        batch, n = tokens.shape
        nxt = torch.arange(1, n + 1, device=roots.device).clamp(max=n - 1)
        ok = torch.cat([tree.valid[:, 1:], torch.zeros_like(tree.valid[:, :1])], 1)
        return tree, Candidates(tokens=tokens[:, nxt][..., None],
                                node=nxt.expand(batch, n)[..., None], ok=ok[..., None],
                                probs=None, dist_of=torch.zeros_like(tokens))

    def commit(self, verdict: Verdict, target_out: Any, lengths: torch.Tensor,
               emitted: list[list[int]]) -> None:
        for row, new in zip(self.rows, emitted):
            row.extend(new)

    def select(self, rows: torch.Tensor) -> "PldState":
        return PldState(self.p, [self.rows[i] for i in rows.tolist()])

    def put(self, rows: torch.Tensor, other: "PldState") -> None:
        for i, r in zip(rows.tolist(), other.rows):
            self.rows[i] = r
