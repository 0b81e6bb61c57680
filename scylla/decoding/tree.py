"""Draft trees as tensors: one tree per batch row, all rows padded to the same node count.

Node 0 is the root: the last emitted token, not yet in the target's cache. Every other node is a
draft token whose parent has a smaller index (topological order), so a node's ancestors come
before it and the accepted path, listed by index, is listed by depth. Padding nodes
(``valid=False``) hang off the root, are never accepted and are never anyone's ancestor, so no
valid node attends them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scylla.errors import ConfigError


@dataclass
class Tree:
    tokens: torch.Tensor  # (B, N) target-vocabulary ids
    parents: torch.Tensor  # (B, N) parent index, -1 at the root
    depth: torch.Tensor  # (B, N) 0 at the root
    valid: torch.Tensor  # (B, N) bool
    max_depth: int  # deepest node (host-side, so building masks needs no device sync)
    # (B, N) the draft's cumulative log-probability of each node's path (root 0), when a draft
    # model grew the tree (the planner ranks nodes by it)
    scores: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> torch.Tensor:
        """(B, N, N) bool: [b, i, j] when j is i or an ancestor of i: the tree attention mask."""
        return ancestor_mask(self.parents, self.max_depth)


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(B, N) parent indices (-1 at roots) -> (B, N, N) ancestor-or-self mask."""
    batch, n = parents.shape
    eye = torch.eye(n, dtype=torch.bool, device=parents.device)
    mask = eye.expand(batch, n, n).clone()
    cur = parents
    for _ in range(max_depth):  # one hop up per iteration
        up = cur >= 0
        mask |= eye[cur.clamp(min=0)] & up[..., None]
        cur = torch.where(up, parents.gather(1, cur.clamp(min=0)), cur)
    return mask


def chain(tokens: torch.Tensor, lengths: torch.Tensor) -> Tree:
    """A chain per row: root + draft tokens (B, K); row b keeps its first lengths[b] of them.

    tokens: (B, 1 + K) with the root in column 0; lengths: (B,) draft tokens per row.
    """
    batch, n = tokens.shape
    idx = torch.arange(n, device=tokens.device)
    valid = idx[None, :] <= lengths[:, None]  # (B, N): the root and the row's own drafts
    parents = (idx - 1).expand(batch, n)
    # padding hangs off the root at depth 1, so no valid node has it as an ancestor
    parents = torch.where(valid, parents, torch.zeros_like(parents))
    depth = torch.where(valid, idx.expand(batch, n), torch.ones_like(parents))
    return Tree(tokens, parents.contiguous(), depth.contiguous(), valid, n - 1)


@dataclass
class Candidates:
    """What T > 0 verification needs besides the tree: each node's children in draw order.

    A node's candidates are the tokens the draft drew for its children, without replacement, in
    draw order. Candidates that tree selection pruned stay in the list (``node`` = -1): they are
    still tested, and if accepted they end the step as its last token.
    """

    tokens: torch.Tensor  # (B, N, C) target-vocabulary ids
    node: torch.Tensor  # (B, N, C) tree index of the candidate, -1 when pruned from the tree
    ok: torch.Tensor  # (B, N, C) bool: a real draw (False: padding or a zero-mass draw)
    # (B, E, V) draft distributions the candidates were drawn from (target vocabulary), and
    # dist_of (B, N) the row of ``probs`` for each node (-1: no candidates); None when every
    # candidate is fixed.
    probs: torch.Tensor | None
    dist_of: torch.Tensor
    # (B, N, C) bool: a deterministic proposal (prompt lookup), proposed with probability 1;
    # fixed candidates come before a node's drawn ones. None: all drawn (all fixed if probs is
    # None).
    fixed: torch.Tensor | None = None

    def fixed_mask(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        return torch.full_like(self.ok, self.probs is None)


def parse_static_tree(text: str) -> list[tuple[int, ...]]:
    """``"0,1,00,01,10"`` -> [(0,), (1,), (0, 0), (0, 1), (1, 0)]: paths of child ranks.

    Each digit is a child's rank among its parent's draft candidates (0 = most likely).
    Sorted by depth, then rank; every path's parent path must be listed too.
    """
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"DecodeConfig.static_tree={text!r}: no branch choices given")
    bad = [s for s in items if not s.isdigit()]
    if bad:
        raise ConfigError(f"DecodeConfig.static_tree={text!r}: choices must be digit strings "
                          f"(child ranks), got {bad}")
    paths = sorted({tuple(int(c) for c in s) for s in items}, key=lambda p: (len(p), p))
    have = set(paths)
    orphans = ["".join(map(str, p)) for p in paths if len(p) > 1 and p[:-1] not in have]
    if orphans:
        raise ConfigError(f"DecodeConfig.static_tree={text!r}: {orphans} lack their parent "
                          "branch (list every prefix)")
    return paths
