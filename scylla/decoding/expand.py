"""Growing a draft tree with the draft model: EAGLE-2's dynamic tree, static trees and chains.

Level 1 holds the children of the root, drawn from the draft's prediction at the root (which the
previous step's catch-up forward computed). Then, for each further level, the draft is fed the
*frontier* (the level's nodes chosen for expansion) in one forward, and each fed node gets its
children from that forward's logits. Nodes are kept in a flat per-row list in creation order,
so a parent always precedes its children.

- dynamic (EAGLE-2): the frontier is the ``tree_top_k`` nodes of the level with the best score
  (cumulative draft log-probability of the path), each gets ``tree_top_k`` children, and the
  ``tree_total_tokens`` best-scoring nodes of all levels are verified.
- static: a fixed list of branch choices decides frontier and kept nodes (a chain is the static
  tree 0, 00, 000, ...).

Each fed node attends to the context, its ancestors fed in earlier forwards (the draft cache's
*window* of tree entries, masked per node) and itself. A node at depth d is fed at draft
position L + d - 1 (EAGLE shift: it predicts the token at depth d + 1), with its parent's draft
hidden state as its feature. Children are the top k at T = 0 and a draw without replacement at
T > 0, from the draft distribution processed exactly like the target's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scylla.decoding import sampling
from scylla.decoding.tree import Candidates, Tree


@dataclass(frozen=True)
class TreeShape:
    """Per level d = 1..depth: children drawn per expanded node; frontier sizes for d < depth."""

    children: tuple[int, ...]  # k_d
    frontier: tuple[int, ...]  # F_d for d = 1..depth-1: nodes of level d fed to the draft
    total: int  # draft tokens verified per step
    # static trees: level-relative indices of the frontier per level, and flat indices kept
    static_frontier: tuple[tuple[int, ...], ...] | None = None
    static_keep: tuple[int, ...] | None = None

    @property
    def depth(self) -> int:
        return len(self.children)

    @property
    def dynamic(self) -> bool:
        return self.static_keep is None

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Nodes created per level: k_1, then F_{d-1} * k_d."""
        sizes = [self.children[0]]
        for f, k in zip(self.frontier, self.children[1:]):
            sizes.append(f * k)
        return tuple(sizes)

    @property
    def fed_tokens(self) -> int:
        """Draft-cache entries one expansion appends (its window at the deepest level)."""
        return sum(self.frontier)


def dynamic_shape(top_k: int, depth: int, total: int) -> TreeShape:
    created = top_k + (depth - 1) * top_k * top_k
    return TreeShape(children=(top_k,) * depth, frontier=(top_k,) * (depth - 1),
                     total=min(total, created))


def chain_shape(draft_len: int) -> TreeShape:
    return static_shape([(0,) * d for d in range(1, draft_len + 1)])


def static_shape(paths: list[tuple[int, ...]]) -> TreeShape:
    """From branch choices (``tree.parse_static_tree``) to flat indices of the level grids."""
    depth = max(len(p) for p in paths)
    by_level = [[p for p in paths if len(p) == d] for d in range(1, depth + 1)]
    children = tuple(max(p[-1] for p in level) + 1 for level in by_level)
    flat: dict[tuple[int, ...], int] = {}
    frontier: list[tuple[int, ...]] = []
    base = prev_base = 0  # prev_base: the level above's first flat index
    for d, level in enumerate(by_level):
        if d == 0:
            for p in level:
                flat[p] = p[-1]
        else:
            parents = sorted({p[:-1] for p in level})
            slot = {q: i for i, q in enumerate(parents)}
            # a node is fed when it has children: its level-relative index
            frontier.append(tuple(flat[q] - prev_base for q in parents))
            for p in level:
                flat[p] = base + slot[p[:-1]] * children[d] + p[-1]
        prev_base = base
        base += children[0] if d == 0 else len(frontier[-1]) * children[d]
    keep = tuple(sorted(flat.values()))
    return TreeShape(children=children, frontier=tuple(len(f) for f in frontier),
                     total=len(keep), static_frontier=tuple(frontier), static_keep=keep)


@dataclass
class DraftRoot:
    """The draft's prediction at each row's root, from the last catch-up forward."""

    logits: torch.Tensor  # (B, Vd)
    hidden: torch.Tensor  # (B, H) the draft feature fed to the root's children


def _children(logp: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature == 0:
        top = logp.topk(k, dim=-1)
        return top.indices, top.values
    return sampling.sample_without_replacement(logp, k, generator)


def _to_target(draft, ids: torch.Tensor) -> torch.Tensor:
    return ids if draft.d2t is None else draft.d2t[ids]


def _target_probs(draft, p: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., Vd) draft-vocabulary probabilities -> (..., V) over the target vocabulary."""
    if draft.d2t is None:
        return p
    out = p.new_zeros(*p.shape[:-1], vocab)
    return out.scatter_(-1, draft.d2t.expand(*p.shape[:-1], -1), p)


def expand(draft, cache, root: DraftRoot, root_tokens: torch.Tensor, lengths: torch.Tensor,
           shape: TreeShape, temperature: float, top_p: float, vocab: int,
           generator: torch.Generator | None = None) -> tuple[Tree, Candidates | None, int]:
    """Grow this step's tree. Returns (tree, candidates at T > 0 else None, draft forwards).

    root_tokens (B,): each row's last emitted token; lengths (B,): the target cache lengths
    (= the draft cache lengths, which are restored on return); vocab: target vocabulary size.
    """
    batch = root_tokens.shape[0]
    device = root_tokens.device
    sampled = temperature > 0
    logp = sampling.log_probs(root.logits, temperature, top_p)  # (B, Vd)
    ids, lp = _children(logp, shape.children[0], temperature, generator)  # (B, k1)
    tokens, scores = [_to_target(draft, ids)], [lp]
    parent = [torch.full_like(ids, -1)]  # flat index of the parent, -1 = the root
    slot_of_parent = [torch.zeros_like(ids)]  # parent's slot in the previous feed
    level_of = [torch.ones_like(ids)]
    dists = [_target_probs(draft, logp.exp(), vocab)[:, None]] if sampled else []
    fed = []  # per feed: (B, F) flat indices of the fed nodes
    base, hidden, window = 0, None, None
    for j, width in enumerate(shape.frontier, start=1):  # feed the level-j frontier
        level_scores = scores[-1]
        if shape.dynamic:
            rel = level_scores.topk(width, dim=-1).indices  # (B, F)
        else:
            rel = torch.tensor(shape.static_frontier[j - 1], device=device).expand(batch, -1)
        flat_tokens = torch.cat(tokens, 1)
        front = base + rel  # (B, F) flat indices
        fed.append(front)
        x = flat_tokens.gather(1, front)
        if j == 1:
            feats = root.hidden[:, None].expand(-1, width, -1)
            anc = torch.zeros(batch, width, 0, dtype=torch.bool, device=device)
        else:
            ps = slot_of_parent[-1].gather(1, rel)  # (B, F) parent's slot in feed j-1
            feats = hidden.gather(1, ps[..., None].expand(-1, -1, hidden.shape[-1]))
            prev = window.gather(1, ps[..., None].expand(-1, -1, window.shape[-1]))
            anc = torch.cat([prev, torch.nn.functional.one_hot(ps, hidden.shape[1]).bool()], -1)
        eye = torch.eye(width, dtype=torch.bool, device=device).expand(batch, -1, -1)
        pos = (lengths + j - 1)[:, None].expand(-1, width)
        out = draft(x, feats, cache=cache, position_ids=pos,
                    tree_mask=torch.cat([anc, eye], -1))
        hidden, window = out.hidden, anc
        k = shape.children[j]
        lp_all = sampling.log_probs(out.logits, temperature, top_p)  # (B, F, Vd)
        ids, lp = _children(lp_all, k, temperature, generator)  # (B, F, k)
        if sampled:
            dists.append(_target_probs(draft, lp_all.exp(), vocab))
        base += scores[-1].shape[1]
        tokens.append(_to_target(draft, ids).flatten(1))
        scores.append((level_scores.gather(1, rel)[..., None] + lp).flatten(1))
        parent.append(front.repeat_interleave(k, dim=1))
        slot_of_parent.append(torch.arange(width, device=device).repeat_interleave(k)
                              .expand(batch, -1))
        level_of.append(torch.full_like(parent[-1], j + 1))
    if shape.frontier:
        cache.set_lengths(lengths)  # drop the tree entries: the catch-up recomputes the path
    flat_tokens, flat_scores = torch.cat(tokens, 1), torch.cat(scores, 1)
    flat_parent, flat_level = torch.cat(parent, 1), torch.cat(level_of, 1)
    if shape.dynamic:
        # stable sort: on equal scores the parent (smaller index) ranks first, so the kept
        # set always contains every kept node's parent
        best = torch.sort(flat_scores, dim=1, descending=True, stable=True).indices
        sel = best[:, :shape.total].sort(dim=1).values  # (B, N-1) in creation order
    else:
        sel = torch.tensor(shape.static_keep, device=device).expand(batch, -1)
    n = sel.shape[1] + 1
    inv = torch.full_like(flat_tokens, -1)  # flat index -> tree index
    inv.scatter_(1, sel, torch.arange(1, n, device=device).expand(batch, -1))
    par = flat_parent.gather(1, sel)
    tree = Tree(
        tokens=torch.cat([root_tokens[:, None], flat_tokens.gather(1, sel)], 1),
        parents=torch.cat([torch.full_like(root_tokens[:, None], -1),
                           torch.where(par >= 0, inv.gather(1, par.clamp(min=0)), 0)], 1),
        depth=torch.cat([torch.zeros_like(root_tokens[:, None]), flat_level.gather(1, sel)], 1),
        valid=torch.cat([torch.ones_like(root_tokens[:, None], dtype=torch.bool),
                         flat_scores.gather(1, sel) > float("-inf")], 1),
        max_depth=shape.depth,
        scores=torch.cat([torch.zeros_like(flat_scores[:, :1]), flat_scores.gather(1, sel)], 1))
    cands = None
    if sampled:
        cands = _candidates(shape, sel, inv, fed, flat_tokens, flat_scores, torch.cat(dists, 1))
    return tree, cands, len(shape.frontier)


def _candidates(shape: TreeShape, sel: torch.Tensor, inv: torch.Tensor, fed: list[torch.Tensor],
                flat_tokens: torch.Tensor, flat_scores: torch.Tensor, probs: torch.Tensor
                ) -> Candidates:
    """Each tree node's children in draw order (pruned ones included) and its distribution."""
    batch, device = sel.shape[0], sel.device
    # expanded node e: 0 = the root, then the fed nodes feed by feed; its children are a
    # contiguous block of the next level
    starts, counts = [0], [shape.children[0]]
    fed_as = torch.full_like(flat_tokens, -1)
    e, base = 1, shape.children[0]
    for j, front in enumerate(fed, start=1):
        width, k = front.shape[1], shape.children[j]
        fed_as.scatter_(1, front, torch.arange(e, e + width, device=device).expand(batch, -1))
        starts += [base + s * k for s in range(width)]
        counts += [k] * width
        e, base = e + width, base + width * k
    node_e = torch.cat([torch.zeros_like(sel[:, :1]), fed_as.gather(1, sel)], 1)  # (B, N)
    width = max(counts)
    start = torch.tensor(starts, device=device)[node_e.clamp(min=0)]  # (B, N)
    count = torch.tensor(counts, device=device)[node_e.clamp(min=0)]
    r = torch.arange(width, device=device)
    flat = (start[..., None] + r).clamp(max=flat_tokens.shape[1] - 1)  # (B, N, C)
    ok = (node_e[..., None] >= 0) & (r < count[..., None])
    flat2 = flat.flatten(1)
    ok &= (flat_scores.gather(1, flat2) > float("-inf")).view_as(flat)
    return Candidates(tokens=flat_tokens.gather(1, flat2).view_as(flat),
                      node=inv.gather(1, flat2).view_as(flat), ok=ok, probs=probs,
                      dist_of=node_e)
