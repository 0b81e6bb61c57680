"""Prompt lookup and the draft model in one tree (method ``hybrid``).

Each step the draft grows its tree as for ``tree`` and the row's n-gram index proposes a chain
(what followed the latest earlier occurrence of the context's last n-gram, in the prompt or the
text generated so far). The chain is grafted onto the draft tree from the root: while its tokens
are children the draft already proposed it walks down the draft tree, and from the first new
token on it hangs as a chain of new nodes. One target forward verifies the union.

Prompt lookup wins where answers copy their prompt (extraction, summaries, RAG), the draft where
the text is new; the union costs the verification of the lookup's new nodes only. When the
planner settles on lookup alone, each row's chain is cut by ``pld.LookupGate`` to the length
that pays this step, down to the root alone, so the decode follows the text in and out of
copying without ever handing itself to plain decoding for good.

At T > 0 a lookup token is a fixed candidate (proposed with probability 1) and is tested before
the draft's candidates of the same node (``verify.verify_sampled``), which keeps the output
distribution the target's. Lookup nodes have no draft candidates of their own.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from scylla.decoding.drafter import DraftProposer, DraftState
from scylla.decoding.planner import AutoPlanner
from scylla.decoding.pld import LookupGate, NgramIndex
from scylla.decoding.prefill import Prefill
from scylla.decoding.timing import synchronize
from scylla.decoding.tree import Candidates, Tree
from scylla.decoding.verify import Verdict


class HybridProposer:
    """A draft tree with an optional lookup chain grafted on (``lookup_len`` 0: the ``tree``
    method). With a ``planner`` the shape is chosen during the decode (``scylla.decoding.
    planner``): calibration first, then the plan, which may be to draft nothing at all."""

    def __init__(self, drafter: DraftProposer, ngram: int, lookup_len: int,
                 planner: AutoPlanner | None = None):
        self.drafter, self.ngram, self.lookup_len = drafter, ngram, lookup_len
        self.lookup_min_match = 1  # propose lookup tokens after a match this long only
        self.planner = planner
        self.hidden_layers = drafter.hidden_layers
        self.prefill_forwards = drafter.prefill_forwards
        self.plan = None
        self.gate = None
        if planner is not None:
            self.gate = LookupGate(ngram, planner.lookup_room) if ngram else None
            # room for the largest tree this decode may verify: the calibration shape's
            drafter.set_shape(planner.shape)
            self.room = drafter.room + planner.lookup_room
            self.plan = planner.start(self)
        else:
            self.room = drafter.room + lookup_len

    @property
    def drafts(self) -> bool:
        """This step grows a draft tree."""
        return self.plan is None or self.plan.drafts or self.calibrating

    @property
    def keeps_draft(self) -> bool:
        """The draft's cache is kept in step: it drafts, or may draft again in this decode."""
        return self.drafts or (self.planner is not None and not self.planner.settled(self.plan))

    @property
    def plain(self) -> bool:
        """Settled on plain decoding: the engine steps plainly, without this proposer."""
        return (self.planner is not None and self.planner.settled(self.plan)
                and self.plan.mode == "plain")

    @property
    def gated(self) -> bool:
        """This step's lookup chains are cut by the gate: a lookup plan (no draft)."""
        return (self.gate is not None and self.plan is not None and self.plan.mode == "lookup"
                and not self.calibrating)

    @property
    def calibrating(self) -> bool:
        return self.planner is not None and self.planner.calibrating

    @property
    def forwards_per_step(self) -> int:
        return self.drafter.forwards_per_step if self.drafts else int(self.keeps_draft)

    def start(self, pre: Prefill) -> "HybridState":
        rows = [NgramIndex(p + [f], self.ngram) for p, f in zip(pre.prompts, pre.first.tolist())]
        return HybridState(self, self.drafter.start(pre) if self.keeps_draft else None, rows)


class HybridState:
    def __init__(self, proposer: HybridProposer, draft: DraftState | None,
                 rows: list[NgramIndex]):
        self.p, self.draft, self.rows = proposer, draft, rows
        self.pending: tuple[Tree, int, list[list[int]]] | None = None  # for calibration
        self.started = 0.0  # when the step began (perf_counter), for the planner
        self.verified = 0  # nodes per row the step verifies

    def propose(self, roots: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None) -> tuple[Tree, Candidates | None]:
        p = self.p
        if p.planner is not None:
            p.planner.begin(p)
        if p.planner is not None:  # steps are timed for the planner
            synchronize(roots.device)
            self.started = time.perf_counter()
        if p.drafts:
            tree, cands = self.draft.propose(roots, lengths, generator)
        else:
            tree, cands = root_only(roots, sampled=p.drafter.temperature > 0)
        lookup_len = p.lookup_len
        if p.gate is not None:  # every row's longest chain is scored, proposed or not
            found = [r.match(p.gate.max_len) for r in self.rows]
            for row, (chain, n) in zip(self.rows, found):
                p.gate.note(row, chain, n)
        else:
            found = [r.match(lookup_len) if lookup_len else ([], 0) for r in self.rows]
        if p.gated:  # the gate cuts the longest chains
            chains = p.gate.cut([chain if n >= p.lookup_min_match else [] for chain, n in found],
                                [n for _, n in found], p.planner.lookup_step_ms)
        else:
            chains = [chain[:lookup_len] if n >= p.lookup_min_match else []
                      for chain, n in found]
        grown, cands, chain_nodes = graft(tree, cands, chains)
        if p.calibrating:
            self.pending = (grown, tree.size, chain_nodes, [n for _, n in found])
        self.verified = grown.size
        return grown, cands

    def commit(self, verdict: Verdict, target_out: Any, lengths: torch.Tensor,
               emitted: list[list[int]]) -> None:
        p = self.p
        caught_up = self.draft is not None and p.keeps_draft
        if caught_up:
            self.draft.commit(verdict, target_out, lengths, emitted)
        for row, new in zip(self.rows, emitted):
            row.extend(new)
            if p.gate is not None:
                p.gate.score(row)
        if p.planner is None:
            return
        synchronize(verdict.count.device)
        wall_ms = (time.perf_counter() - self.started) * 1e3
        catch_up = int(verdict.count.max()) if caught_up else 0
        if self.pending is not None:
            p.planner.record(p, *self.pending, target_out.logits, wall_ms, catch_up)
            self.pending = None
        elif p.plan is not None:
            p.planner.observe(p.plan, wall_ms, self.verified, catch_up)
            p.planner.review(p)

    def select(self, rows: torch.Tensor) -> "HybridState":
        draft = self.draft.select(rows) if self.draft is not None else None
        return HybridState(self.p, draft, [self.rows[i] for i in rows.tolist()])

    def put(self, rows: torch.Tensor, other: "HybridState") -> None:
        if self.draft is not None and other.draft is not None:
            self.draft.put(rows, other.draft)
        for i, r in zip(rows.tolist(), other.rows):
            self.rows[i] = r


def root_only(roots: torch.Tensor, sampled: bool) -> tuple[Tree, Candidates | None]:
    """A tree of the root alone: the step is a plain decoding step."""
    batch = roots.shape[0]
    zeros = torch.zeros(batch, 1, dtype=torch.long, device=roots.device)
    tree = Tree(tokens=roots[:, None], parents=zeros - 1, depth=zeros,
                valid=torch.ones(batch, 1, dtype=torch.bool, device=roots.device), max_depth=0,
                scores=zeros.float())
    if not sampled:
        return tree, None
    return tree, Candidates(tokens=zeros[..., None], node=zeros[..., None] - 1,
                            ok=torch.zeros(batch, 1, 1, dtype=torch.bool, device=roots.device),
                            probs=None, dist_of=zeros - 1)


def graft(tree: Tree, cands: Candidates | None, chains: list[list[int]]
          ) -> tuple[Tree, Candidates | None, list[list[int]]]:
    """Each row's lookup chain grafted onto its draft tree from the root (see the module
    docstring); rows are padded to the same node count with invalid nodes off the root.
    Also returns each row's chain as tree indices."""
    if not any(chains):
        return tree, cands, [[] for _ in chains]
    batch, n = tree.tokens.shape
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    depth, valid = tree.depth.tolist(), tree.valid.tolist()
    lookup_child: list[dict[int, int]] = []  # per row: node -> its lookup child's index
    chain_nodes: list[list[int]] = []
    for b, chain in enumerate(chains):
        child_of = {(parents[b][i], tokens[b][i]): i for i in range(1, n) if valid[b][i]}
        cur, links = 0, {}
        for tok in chain:
            nxt = child_of.get((cur, tok))
            if nxt is None:  # a new node; later chain tokens cannot match draft nodes
                nxt = len(tokens[b])
                tokens[b].append(tok)
                parents[b].append(cur)
                depth[b].append(depth[b][cur] + 1)
                valid[b].append(True)
                child_of[cur, tok] = nxt
            links[cur] = nxt
            cur = nxt
        lookup_child.append(links)
        chain_nodes.append(list(links.values()))
    size = max(len(t) for t in tokens)
    for b in range(batch):  # padding hangs off the root, as in ``tree.chain``
        pad = size - len(tokens[b])
        tokens[b] += [0] * pad
        parents[b] += [0] * pad
        depth[b] += [1] * pad
        valid[b] += [False] * pad
    device = tree.tokens.device
    grown = Tree(tokens=torch.tensor(tokens, device=device),
                 parents=torch.tensor(parents, device=device),
                 depth=torch.tensor(depth, device=device),
                 valid=torch.tensor(valid, device=device),
                 max_depth=max(tree.max_depth, max(max(d) for d in depth)),
                 scores=None if tree.scores is None else torch.cat(  # lookup nodes: none
                     [tree.scores, tree.scores.new_full((batch, size - n), float("-inf"))], 1))
    if cands is None:
        return grown, None, chain_nodes
    return grown, _with_lookup_candidates(cands, grown, lookup_child), chain_nodes


def _with_lookup_candidates(cands: Candidates, tree: Tree, lookup_child: list[dict[int, int]]
                            ) -> Candidates:
    """The draft's candidates with each node's lookup child first, as a fixed candidate.

    A node's list stays packed from the left (``verify_sampled`` stops at the first column no
    row has); new lookup nodes have no draft candidates."""
    batch, n, c = cands.tokens.shape
    size = tree.size
    tokens = torch.zeros(batch, size, c + 1, dtype=cands.tokens.dtype)
    node = torch.full((batch, size, c + 1), -1, dtype=cands.node.dtype)
    ok = torch.zeros(batch, size, c + 1, dtype=torch.bool)
    fixed = torch.zeros(batch, size, c + 1, dtype=torch.bool)
    dist_of = torch.full((batch, size), -1, dtype=cands.dist_of.dtype)
    src_tokens, src_node = cands.tokens.cpu(), cands.node.cpu()
    src_ok, src_dist = cands.ok.cpu(), cands.dist_of.cpu()
    tree_tokens = tree.tokens.cpu()
    for b, links in enumerate(lookup_child):
        tokens[b, :n, :c], node[b, :n, :c] = src_tokens[b], src_node[b]
        ok[b, :n, :c], dist_of[b, :n] = src_ok[b], src_dist[b]
        for at, child in links.items():
            tokens[b, at] = torch.cat([tree_tokens[b, child:child + 1], tokens[b, at, :c]])
            node[b, at] = torch.cat([torch.tensor([child]), node[b, at, :c]])
            ok[b, at] = torch.cat([torch.tensor([True]), ok[b, at, :c]])
            fixed[b, at, 0] = True
    device = cands.tokens.device
    return Candidates(tokens=tokens.to(device), node=node.to(device), ok=ok.to(device),
                      probs=cands.probs, dist_of=dist_of.to(device), fixed=fixed.to(device))
