"""The hybrid tree: a prompt-lookup chain grafted onto the draft's tree."""
from __future__ import annotations

import torch

from scylla.decoding.hybrid import graft
from scylla.decoding.tree import Candidates, Tree


def draft_tree() -> tuple[Tree, Candidates]:
    """Root 7 with children 1 (node 1) and 2 (node 2); node 1 has child 3 (node 3)."""
    tree = Tree(tokens=torch.tensor([[7, 1, 2, 3]]), parents=torch.tensor([[-1, 0, 0, 1]]),
                depth=torch.tensor([[0, 1, 1, 2]]), valid=torch.ones(1, 4, dtype=torch.bool),
                max_depth=2)
    cands = Candidates(tokens=torch.tensor([[[1, 2], [3, 4], [0, 0], [0, 0]]]),
                       node=torch.tensor([[[1, 2], [3, -1], [-1, -1], [-1, -1]]]),
                       ok=torch.tensor([[[True, True], [True, True], [False, False],
                                         [False, False]]]),
                       probs=torch.rand(1, 2, 10), dist_of=torch.tensor([[0, 1, -1, -1]]))
    return tree, cands


def test_a_chain_walks_shared_nodes_then_hangs_new_ones():
    tree, cands = draft_tree()
    grown, c, nodes = graft(tree, cands, [[1, 3, 5, 6]])
    assert nodes == [[1, 3, 4, 5]]
    # 1 and 3 are the draft's nodes 1 and 3; 5 and 6 are new nodes 4 and 5
    assert grown.tokens.tolist() == [[7, 1, 2, 3, 5, 6]]
    assert grown.parents.tolist() == [[-1, 0, 0, 1, 3, 4]]
    assert grown.depth.tolist() == [[0, 1, 1, 2, 3, 4]]
    assert grown.max_depth == 4 and bool(grown.valid.all())
    # each node on the chain tests its lookup child first, as a fixed candidate
    assert c.tokens[0, 0].tolist() == [1, 1, 2] and c.node[0, 0].tolist() == [1, 1, 2]
    assert c.fixed[0, :, 0].tolist() == [True, True, False, True, True, False]
    assert c.node[0, 3].tolist() == [4, -1, -1] and c.node[0, 4].tolist() == [5, -1, -1]
    assert c.ok[0, 5].tolist() == [False] * 3  # the chain's end proposes nothing
    assert c.dist_of[0].tolist() == [0, 1, -1, -1, -1, -1]
    assert not bool(c.fixed[0, 2].any()) and c.tokens[0, 2, :2].tolist() == [0, 0]


def test_rows_are_padded_off_the_root():
    tree, cands = draft_tree()
    two = Tree(tokens=tree.tokens.repeat(2, 1), parents=tree.parents.repeat(2, 1),
               depth=tree.depth.repeat(2, 1), valid=tree.valid.repeat(2, 1), max_depth=2)
    grown, c, nodes = graft(two, None, [[9, 8], []])
    assert nodes == [[4, 5], []]
    assert grown.tokens.shape == (2, 6) and c is None
    assert grown.valid.tolist()[1] == [True] * 4 + [False] * 2
    assert grown.parents.tolist()[1][4:] == [0, 0]
    assert grown.parents.tolist()[0][4:] == [0, 4]


def test_the_calibration_tree_fits_the_cache_to_the_last_token():
    """While calibrating, a step verifies the large tree plus the whole lookup chain, also on a
    row's last steps: the decode's cache leaves room for both."""
    import random

    from decoding_fixtures import OracleDraft, tiny_target

    from scylla.config import DecodeConfig
    from scylla.decoding import METHODS

    target = tiny_target(24, hidden=32, init=0.3)
    target.model.config.eos_token_ids = []
    g = random.Random(0)  # repeated tokens: the lookup finds long chains
    prompts = [[1] + [g.randrange(3, 8) for _ in range(g.randrange(5, 40))] for _ in range(3)]
    for temperature in (0.0, 0.8):
        cfg = DecodeConfig(method="hybrid", max_new_tokens=8, temperature=temperature,
                           tree_top_k=3)
        res = METHODS["hybrid"](target, prompts, cfg, OracleDraft(target, noise=1.5))
        assert [len(t) for t in res.tokens] == [8, 8, 8]


def test_the_lookup_gate_scores_chains_on_the_emitted_text_and_cuts_them_to_what_pays():
    """Chains are scored once the text they predicted is emitted, proposed or not: a text that
    repeats itself earns its long matches their whole chain, while 1-token matches that never
    come true are cut to nothing, and a chain still waiting for its text stays unscored."""
    from scylla.decoding.pld import LookupGate, NgramIndex

    def step_ms(k: int) -> float:  # a lookup step costs 1.2 plain steps, and more per token
        return 10.0 if k == 0 else 12.0 + 0.5 * k

    gate = LookupGate(max_n=3, max_len=4)
    row = NgramIndex([5, 6, 7, 8, 9, 5, 6, 7], max_n=3)
    for _ in range(20):  # the row repeats 5 6 7 8 9: each chain matched on 3 tokens comes true
        chain, n = row.match(4)
        gate.note(row, chain, n)
        row.extend(chain[:1])
        gate.score(row)
    assert gate.scored[3, 1] >= 15 and gate.hits[3, 4] == gate.scored[3, 4]
    chain, n = row.match(4)
    assert n == 3 and gate.cut([chain], [n], step_ms) == [chain]

    other = NgramIndex([1, 2, 1, 3, 1, 4, 1], max_n=3)
    for t in range(20):  # after every 1 comes a new token: a 1-token match never comes true
        chain, n = other.match(4)
        gate.note(other, chain, n)
        other.extend([100 + t, 1])
        gate.score(other)
    assert gate.scored[1, 1] == 20 and gate.hits[1, 1] == 0
    chain, n = other.match(4)
    assert n == 1 and chain and gate.cut([chain], [n], step_ms) == [[]]
    # verified together, rows pay the longest row's chain: the poor row rides along
    good, g = row.match(4)
    assert gate.cut([good, chain], [g, n], step_ms) == [good, chain]

    waiting = NgramIndex([5, 6, 7, 5, 6], max_n=3)
    gate.note(waiting, *waiting.match(4))
    before = gate.scored.copy()
    waiting.extend([7])  # matches so far: the chain's outcome is not known yet
    gate.score(waiting)
    assert (gate.scored == before).all() and len(waiting.pending) == 1
