"""The planner's arithmetic: counterfactual accepted lengths and the choice they imply."""
from __future__ import annotations

import dataclasses

import numpy as np

from scylla.decoding.planner import Costs, Step, choose, outcome


def step(accepted_depths: int, chain_run: int = 0, chain_shared: int = 0) -> Step:
    """A calibration step over a width-2 tree of depth 3: the rank-0 path (nodes 1, 3, 5 at
    depths 1..3, best scores) is accepted down to ``accepted_depths``; every other node
    is rejected. The lookup chain has 4 tokens, its first ``chain_shared`` on the rank-0 path,
    its first ``chain_run`` accepted."""
    depths = np.array([1, 1, 2, 2, 3, 3])
    scores = np.array([-0.1, -2.0, -0.2, -2.1, -0.3, -2.2])
    accepted = np.array([d <= accepted_depths if i % 2 == 0 else False
                         for i, d in enumerate(depths)])
    path = [1, 3, 5]
    chain = path[:chain_shared] + list(range(7, 7 + 4 - chain_shared))
    return Step(scores=scores, depths=depths, accepted=accepted, chain=chain,
                chain_accepted=[i < chain_run for i in range(4)], n_draft=7)


def test_outcome_counts_the_deepest_accepted_node_and_new_lookup_nodes():
    s = step(accepted_depths=2, chain_run=3, chain_shared=1)
    assert outcome(s, total=6, depth=3, lookup=0) == (3, 7)
    assert outcome(s, total=1, depth=3, lookup=0) == (2, 2)  # node 1 only
    assert outcome(s, total=6, depth=1, lookup=0) == (2, 3)  # depth-1 nodes only
    # the chain's first token is the draft's node 1, its next 3 are new; 3 accepted
    assert outcome(s, total=6, depth=3, lookup=4) == (4, 1 + 6 + 3)
    assert outcome(s, total=6, depth=3, lookup=2) == (3, 1 + 6 + 1)


def curve(per_token_ms: float, draft_ms: float = 1.0) -> Costs:
    ks = [1, 2, 4, 8, 16, 33]
    return Costs([{"k": k, "target_ms": 30 + per_token_ms * (k - 1), "draft_ms": draft_ms}
                  for k in ks])


def test_costly_verification_decodes_plainly():
    steps = [step(accepted_depths=1)] * 40  # half a token more per step at best
    plan = choose(steps, curve(per_token_ms=30.0), width=2, lookup=False)
    assert plan.mode == "plain" and plan.speedup == 1.0


def test_cheap_verification_and_good_drafts_build_the_deep_tree():
    steps = [step(accepted_depths=3)] * 40
    plan = choose(steps, curve(per_token_ms=0.5), width=2, lookup=False)
    assert plan.mode == "tree" and plan.tree_depth == 3 and plan.tau == 4.0
    assert plan.tree_total_tokens >= 3 and plan.speedup > 3


def test_a_useless_draft_and_a_good_lookup_choose_lookup_alone():
    steps = [step(accepted_depths=0, chain_run=4)] * 40
    plan = choose(steps, curve(per_token_ms=2.0, draft_ms=20.0), width=2, lookup=True)
    assert plan.mode == "lookup" and plan.lookup_len == 4 and plan.tau == 5.0


def test_host_side_time_of_a_step_counts_against_speculation():
    """The same steps and costs that build a deep tree decode plainly when each calibration
    step took far longer than its forwards (host-side work the cost curve does not see)."""
    fast = [step(accepted_depths=3)] * 40
    assert choose(fast, curve(per_token_ms=0.5), width=2, lookup=False).mode == "tree"
    slow = [dataclasses.replace(s, wall_ms=1000.0, verified=25, catch_up=4) for s in fast]
    plan = choose(slow, curve(per_token_ms=0.5), width=2, lookup=False)
    assert plan.mode == "plain"
