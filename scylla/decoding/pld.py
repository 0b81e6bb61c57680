"""Prompt-lookup drafting: propose what followed the latest earlier occurrence of the context's
last n-gram (n = pld_ngram down to 1). No draft model; a cheap baseline that shines when the
output copies from the prompt (summaries, RAG, code edits).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
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
        # chains proposed here that ``LookupGate`` has yet to score: (chain, n, position)
        self.pending: list[tuple[list[int], int, int]] = []
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


class LookupGate:
    """How many tokens of a row's lookup chain are worth verifying this step.

    Every step each row's chain (up to ``max_len`` tokens, matched on an n-gram of length n) is
    scored once the text it predicted has been emitted: how many of its first tokens the
    emitted text repeats, whether they were verified or not (at T = 0 exactly what their
    verification would have accepted). From those scores, per match length n, P(the first j
    tokens match) is estimated (with one pseudo-chain of half hits and half misses), and the
    chains are cut to the k tokens, k = 0 included, with the most expected tokens per ms:
    (1 + sum of P(first j match), j <= k) / step_ms(k) for one row, summed over the rows
    verified together (each row's chain up to k tokens), where ``step_ms(k)`` is what a step
    verifying k lookup tokens per row costs. On Spec-Bench lookup acceptance moves with the
    text (2.5 tokens a step on extraction, 1.15 on writing) and a short match predicts less
    than a long one, so where lookups do not pay the rows step with their root alone.
    """

    def __init__(self, max_n: int, max_len: int):
        self.max_len = max_len
        # [n, j]: chains matched on an n-gram scored with j tokens or more, and those whose
        # first j tokens matched
        self.scored = np.zeros((max_n + 1, max_len + 1))
        self.hits = np.zeros((max_n + 1, max_len + 1))

    def note(self, row: NgramIndex, chain: list[int], n: int) -> None:
        """``row`` proposes ``chain`` (all of it, verified or not) to follow its last token."""
        if chain:
            row.pending.append((chain, n, len(row.tokens)))

    def score(self, row: NgramIndex) -> None:
        """Score the row's chains whose outcome its emitted text now shows."""
        left = []
        for proposed, n, at in row.pending:
            shown = row.tokens[at:at + len(proposed)]
            run = next((j for j, (a, b) in enumerate(zip(proposed, shown)) if a != b),
                       len(shown))
            if run < len(shown) or len(shown) == len(proposed):
                self.scored[n, 1:len(proposed) + 1] += 1
                self.hits[n, 1:run + 1] += 1
            else:
                left.append((proposed, n, at))
        row.pending = left

    def cut(self, chains: list[list[int]], matches: list[int],
            step_ms: Callable[[int], float]) -> list[list[int]]:
        """Every row's chain (matched on ``matches[b]`` context tokens) cut to its first k
        tokens, one k for the rows verified together, since their verification costs the
        longest row's: the k with the most expected tokens per ms over the rows."""
        longest = max(map(len, chains), default=0)
        upto = np.arange(longest + 1)
        tokens = np.full(longest + 1, float(len(chains)))  # each row's own token
        for row, n in zip(chains, matches):
            k = len(row)
            p = (self.hits[n, 1:k + 1] + 0.5) / (self.scored[n, 1:k + 1] + 1)
            tokens += np.concatenate([[0.0], np.cumsum(p)])[np.minimum(upto, k)]
        rates = tokens / np.array([step_ms(j) for j in upto])
        k = int(np.argmax(rates))
        return [row[:k] for row in chains]


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
