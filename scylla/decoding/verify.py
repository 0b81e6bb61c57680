"""Which draft tokens the target accepts: the one verification rule every method shares.

Both rules walk the tree from the root and return a ``Verdict``: the accepted path (what the
target's and the draft's caches keep) and the tokens the step emits (the accepted drafts plus
one token from the target, so a step always emits at least one token).

- ``verify_greedy`` (T = 0): a child is accepted when its token is the target's argmax at its
  parent; the deepest accepted node ends the path and the target's argmax there is the bonus.
- ``verify_sampled`` (T > 0): multi-candidate speculative sampling. At each node on the path the
  children are tested in the order the draft drew them (without replacement from p): accept y
  with probability min(1, q(y) / p(y)); on rejection q <- norm(max(0, q - p)) and y is removed
  from p (renormalised) before the next sibling. When all are rejected the step ends with a draw
  from the residual q. By induction over the siblings each node emits exactly a sample of the
  target's q, so the output distribution is the target's (see tests/test_sampling_lossless.py).
  A fixed candidate (prompt lookup) is a draw from the one-hot distribution on its token: it is
  accepted with probability q(y), and on rejection q loses y; the draft's p is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scylla.decoding.sampling import draw
from scylla.decoding.tree import Candidates, Tree


@dataclass
class Verdict:
    keep_idx: torch.Tensor  # (B, M) tree indices of the accepted path, root first
    count: torch.Tensor  # (B,) nodes on the path = tokens emitted (accepted drafts + 1)
    tokens: torch.Tensor  # (B, M) emitted tokens; row b's are tokens[b, :count[b]]
    tested: torch.Tensor  # (B, D) bool: draft position i was tested (path reached depth i and
    #                       that node had candidates)
    accepted: torch.Tensor  # (B, D) bool: draft position i was accepted


def has_children(tree: Tree) -> torch.Tensor:
    """(B, N) bool: the node has at least one valid child."""
    idx = torch.arange(tree.size, device=tree.tokens.device)
    counts = torch.zeros_like(tree.parents).scatter_add_(
        1, tree.parents.clamp(min=0), (tree.valid & (idx > 0)).long())
    return counts > 0


def _path_order(on_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, N) path membership -> (keep_idx (B, M), count (B,), M): members by index."""
    count = on_path.sum(-1)
    width = int(count.max())
    keep_idx = torch.sort((~on_path).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return keep_idx, count, width


def greedy_accepted(tree: Tree, pred: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: every node from the root down to this one is its parent's argmax ``pred``
    (B, N) (the root counts as accepted)."""
    match = (tree.tokens == pred.gather(1, tree.parents.clamp(min=0))) & tree.valid
    match[:, 0] = True
    return ~(ancestors & ~match[:, None, :]).any(-1)


def verify_greedy(tree: Tree, logits: torch.Tensor, ancestors: torch.Tensor) -> Verdict:
    """logits (B, N, V) of the target at every node; ancestors (B, N, N) = tree.ancestors()."""
    pred = logits.argmax(-1)  # (B, N) the target's token after each node
    if tree.size == 1:  # the root alone: a plain decoding step's token, nothing tested
        batch = pred.shape[0]
        none = torch.zeros(batch, 0, dtype=torch.bool, device=pred.device)
        return Verdict(torch.zeros_like(pred), torch.ones_like(pred[:, 0]), pred, none, none)
    accepted = greedy_accepted(tree, pred, ancestors)
    best = torch.where(accepted, tree.depth, -1).argmax(-1)  # (B,) deepest accepted node
    on_path = ancestors[torch.arange(tree.tokens.shape[0], device=best.device), best]
    keep_idx, count, width = _path_order(on_path)
    tokens = pred.gather(1, keep_idx)  # accepted children equal their parent's argmax
    d = torch.arange(tree.max_depth, device=count.device)
    node = keep_idx.gather(1, d.clamp(max=width - 1).expand(count.shape[0], -1))  # (B, D)
    tested = (count[:, None] > d) & has_children(tree).gather(1, node)
    return Verdict(keep_idx, count, tokens, tested, count[:, None] > d + 1)


def verify_sampled(tree: Tree, q: torch.Tensor, cands: Candidates,
                   generator: torch.Generator | None = None) -> Verdict:
    """q (B, N, V): the target's sampling distribution at every node (temperature / top-p
    applied, see sampling.probs); cands: each node's candidates in draw order."""
    batch, _, vocab = q.shape
    rows = torch.arange(batch, device=q.device)
    cur = torch.zeros(batch, dtype=torch.long, device=q.device)
    alive = torch.ones(batch, dtype=torch.bool, device=q.device)
    path, emitted, tested, accepted = [cur], [], [], []
    for _ in range(tree.max_depth + 1):
        qc = q[rows, cur]  # (B, V)
        p = None  # (B, V) the draft distribution the candidates were drawn from
        if cands.probs is not None:
            p = cands.probs[rows, cands.dist_of[rows, cur].clamp(min=0)]
        ok = cands.ok[rows, cur] & alive[:, None]  # (B, C)
        fixed = cands.fixed_mask()[rows, cur]  # (B, C)
        nxt = torch.full_like(cur, -1)  # accepted candidate inside the tree
        last = torch.full_like(cur, -1)  # the step's final token (pruned candidate or residual)
        pending = ok[:, 0].clone()
        tested.append(pending.clone())
        for r in range(ok.shape[1]):
            test = pending & ok[:, r]
            if not bool(test.any()):
                break
            y = cands.tokens[rows, cur, r]  # (B,)
            fy = fixed[:, r]
            qy = qc.gather(1, y[:, None]).squeeze(1)
            py = torch.ones_like(qy) if p is None else p.gather(1, y[:, None]).squeeze(1)
            py = torch.where(fy, torch.ones_like(qy), py)  # a fixed proposal has p = one-hot
            u = torch.rand(batch, device=q.device, generator=generator)
            acc = test & (u * py < qy)  # probability min(1, q(y) / p(y))
            node = cands.node[rows, cur, r]
            nxt = torch.where(acc & (node >= 0), node, nxt)
            last = torch.where(acc & (node < 0), y, last)
            rej = test & ~acc
            one_hot = torch.nn.functional.one_hot(y, vocab).to(qc.dtype)
            pv = one_hot if p is None else torch.where(fy[:, None], one_hot, p)
            res = (qc - pv).clamp_min(0)
            mass = res.sum(-1, keepdim=True)
            # mass 0 means q == p, where rejection has probability 0: keep q (float noise)
            qc = torch.where(rej[:, None] & (mass > 0), res / mass.clamp_min(1e-30), qc)
            if p is not None:  # a drawn candidate leaves the draft's distribution
                p_rest = p.scatter(1, y[:, None], 0.0)
                p_rest = p_rest / p_rest.sum(-1, keepdim=True).clamp_min(1e-30)
                p = torch.where((rej & ~fy)[:, None], p_rest, p)
            pending &= ~acc
        accepted.append(alive & ((nxt >= 0) | (last >= 0)))
        residual = alive & (nxt < 0) & (last < 0)
        last = torch.where(residual, draw(qc, generator), last)
        emitted.append(torch.where(nxt >= 0, tree.tokens[rows, nxt.clamp(min=0)], last))
        alive &= nxt >= 0
        cur = torch.where(alive, nxt, cur)
        path.append(torch.where(alive, nxt, -1))
        if not bool(alive.any()):
            break
    steps = torch.stack(path[1:], 1)  # (B, S) accepted in-tree node per level, -1 after
    count = 1 + (steps >= 0).sum(-1)
    width = int(count.max())
    keep_idx = torch.cat([path[0][:, None], steps], 1)[:, :width]
    keep_idx = torch.where(keep_idx >= 0, keep_idx, keep_idx[:, :1])  # pad with the root
    tokens = torch.stack(emitted, 1)[:, :width]
    tokens = torch.where(tokens >= 0, tokens, tokens[:, :1])  # pad past count with real ids
    depth = tree.max_depth
    pad = torch.zeros(batch, depth, dtype=torch.bool, device=q.device)
    t = torch.stack(tested, 1)[:, :depth]
    a = torch.stack(accepted, 1)[:, :depth]
    tested_all, accepted_all = pad.clone(), pad.clone()
    tested_all[:, :t.shape[1]] = t
    accepted_all[:, :a.shape[1]] = a
    return Verdict(keep_idx, count, tokens, tested_all, accepted_all)
