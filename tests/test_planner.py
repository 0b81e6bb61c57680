"""The planner's arithmetic: counterfactual accepted lengths and the choice they imply."""
from __future__ import annotations

import dataclasses
import json
import types
from typing import Any

import numpy as np
import pytest
import torch

from scylla.decoding.planner import (
    CALIBRATION_STEPS,
    OBSERVED_MIN,
    REPLAN_EVERY,
    WINDOW,
    AutoPlanner,
    Costs,
    Plan,
    Step,
    choose,
    outcome,
)


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
    plan = choose(steps, curve(per_token_ms=30.0), width=2, max_match=0)
    assert plan.mode == "plain" and plan.speedup == 1.0


def test_cheap_verification_and_good_drafts_build_the_deep_tree():
    steps = [step(accepted_depths=3)] * 40
    plan = choose(steps, curve(per_token_ms=0.5), width=2, max_match=0)
    assert plan.mode == "tree" and plan.tree_depth == 3 and plan.tau == 4.0
    assert plan.tree_total_tokens >= 3 and plan.speedup > 3


def test_a_useless_draft_and_a_good_lookup_choose_lookup_alone():
    steps = [step(accepted_depths=0, chain_run=4)] * 40
    plan = choose(steps, curve(per_token_ms=2.0, draft_ms=20.0), width=2, max_match=3)
    assert plan.mode == "lookup" and plan.lookup_len == 4 and plan.tau == 5.0


def test_host_side_time_of_a_step_counts_against_speculation():
    """The same steps and costs that build a deep tree decode plainly when each calibration
    step took far longer than its forwards (host-side work the cost curve does not see)."""
    fast = [step(accepted_depths=3)] * 40
    assert choose(fast, curve(per_token_ms=0.5), width=2, max_match=0).mode == "tree"
    slow = [dataclasses.replace(s, wall_ms=1000.0, verified=25, catch_up=4) for s in fast]
    plan = choose(slow, curve(per_token_ms=0.5), width=2, max_match=0)
    assert plan.mode == "plain"


def test_lookup_waits_for_the_match_length_that_pays():
    """Chains after a two-token match are all rejected, chains after a three-token match all
    accepted: the plan proposes lookup tokens after three-token matches only."""
    steps = [dataclasses.replace(step(accepted_depths=0, chain_run=4 if i % 2 else 0),
                                 match=3 if i % 2 else 2, group=i) for i in range(40)]
    costs = curve(per_token_ms=8.0, draft_ms=20.0)
    plan = choose(steps, costs, width=2, max_match=3)
    assert plan.mode == "lookup" and plan.lookup_min_match == 3 and plan.lookup_len == 4
    # half the steps accept 4 lookup tokens (5 tokens for a 5-token forward), half verify the
    # root alone: (20 * 5 + 20 * 1) / (20 * 62 + 20 * 30) ms against plain's 1 / 30 ms
    assert plan.speedup == pytest.approx(120 / 1840 * 30)
    assert plan.tau == pytest.approx(3.0)


def test_a_verification_costs_its_largest_row():
    """Rows verified together pay one forward of the largest row's tree: a row with a 4-token
    lookup chain next to one with none costs a 5-token forward for both."""
    hit = dataclasses.replace(step(accepted_depths=0, chain_run=4), match=3)
    miss = dataclasses.replace(step(accepted_depths=0), chain=[], chain_accepted=[], match=0)
    costs = curve(per_token_ms=8.0, draft_ms=20.0)
    alone = [dataclasses.replace(s, group=i) for i, s in enumerate([hit, miss] * 20)]
    together = [dataclasses.replace(s, group=i // 2, batch=2)
                for i, s in enumerate([hit, miss] * 20)]
    # alone: (5 + 1) tokens in 62 + 30 ms; together: 6 tokens in one 62 ms forward of two
    # rows, against plain's 2 tokens in 30 ms
    assert choose(alone, costs, width=2, max_match=3).speedup == pytest.approx(6 / 92 * 30)
    plan = choose(together, costs, width=2, max_match=3, batch=2)
    assert plan.mode == "lookup" and plan.speedup == pytest.approx(6 / 62 * 15)


def test_a_table_from_one_row_at_a_time_prices_a_batch_by_its_largest_row():
    """A table recorded at batch 1 (each row-step verified alone), planned for batch 8: one
    row-step in 8 has an accepted 4-token lookup. Alone that pays (its 5-token forward serves
    that row only); at batch 8 nearly every verification holds such a row and pays the 5-token
    forward for all 8, which no longer beats plain decoding."""
    hit = dataclasses.replace(step(accepted_depths=0, chain_run=4), match=3)
    miss = dataclasses.replace(step(accepted_depths=0), chain=[], chain_accepted=[], match=0)
    table = [dataclasses.replace(s, group=i) for i, s in enumerate(([hit] + [miss] * 7) * 8)]
    costs = curve(per_token_ms=8.0, draft_ms=20.0)
    alone = choose(table, costs, width=2, max_match=3)
    assert alone.mode == "lookup"
    assert alone.speedup == pytest.approx(12 / (62 + 7 * 30) * 30)
    # expected: 8 rows share a forward, 62 ms unless none of them hits ((7/8) ** 8): 12 tokens
    # in ~51 ms against plain's 8 in 30 ms
    assert choose(table, costs, width=2, max_match=3, batch=8).mode == "plain"
    # a table recorded at batch 8 keeps its own verifications: one hit in each of them costs
    # the 5-token forward every time; all hits in one verification cost it once
    spread = [dataclasses.replace(s, batch=8, group=i // 8) for i, s in enumerate(table)]
    assert choose(spread, costs, width=2, max_match=3, batch=8).mode == "plain"
    bunched = sorted(spread, key=lambda s: s.match != 3)
    bunched = [dataclasses.replace(s, group=i // 8) for i, s in enumerate(bunched)]
    plan = choose(bunched, costs, width=2, max_match=3, batch=8)
    assert plan.mode == "lookup" and plan.speedup == pytest.approx(96 / 272 * 30 / 8)


def drive(monkeypatch, calibration: Step, steps: int, draft: Any = None
          ) -> tuple[list[bool], Any, AutoPlanner]:
    """Run the planner's per-step protocol ``steps`` times; every calibration step records
    ``calibration`` (one row). Returns which steps calibrated, the proposer and the planner."""
    import scylla.decoding.planner as planner

    monkeypatch.setattr(planner, "measured_costs", lambda *a: curve(per_token_ms=0.5))
    monkeypatch.setattr(planner, "record", lambda *a: [calibration])
    if draft is None:  # the calibration table is kept per draft (weakly, and on disk)
        draft = torch.nn.Linear(3, 2)
    auto = AutoPlanner(model=None, draft=draft, width=2, ngram=0, batch=1, temperature=0.0)
    shapes: list[Any] = []
    proposer = types.SimpleNamespace(plan=None, lookup_len=0, lookup_min_match=1,
                                     drafter=types.SimpleNamespace(set_shape=shapes.append))
    proposer.plan = auto.start(proposer)
    calibrated = []
    for _ in range(steps):
        auto.begin(proposer)
        calibrated.append(auto.calibrating)
        if auto.calibrating:
            auto.record(proposer, None, 0, [], [], None, 0.0, 0)
    return calibrated, proposer, auto


def test_plans_calibrate_again_until_plain_decoding_is_settled(monkeypatch):
    """A drafting plan calibrates again one verification in REPLAN_EVERY for good; a plan that
    does not draft does so only until the window is full, then it is settled (final)."""
    calibrated, proposer, _ = drive(monkeypatch, step(accepted_depths=3), 1200)
    assert proposer.plan.mode == "tree"
    assert calibrated[:CALIBRATION_STEPS] == [True] * CALIBRATION_STEPS
    later = [i for i, c in enumerate(calibrated) if c and i >= CALIBRATION_STEPS]
    assert later == list(range(CALIBRATION_STEPS + REPLAN_EVERY - 1, 1200, REPLAN_EVERY))
    calibrated, proposer, _ = drive(monkeypatch, dataclasses.replace(
        step(accepted_depths=0), wall_ms=1000.0), 1200)
    assert proposer.plan.mode == "plain" and sum(calibrated) == WINDOW
    assert calibrated[-REPLAN_EVERY * 3:] == [False] * REPLAN_EVERY * 3


@pytest.mark.parametrize("slower, mode", [(1.0, "tree"), (30.0, "plain")])
def test_the_decodes_own_step_times_correct_the_cost_curve(monkeypatch, slower, mode):
    """Steps of a tree plan timed at their predicted forwards keep the tree at the next plan;
    steps that take far longer (a busier machine, host-side work) turn it to plain decoding.
    Steps of a plain plan are not timed for this."""
    _, proposer, auto = drive(monkeypatch, step(accepted_depths=3), CALIBRATION_STEPS)
    plan = proposer.plan
    assert plan.mode == "tree" and auto.slowdown() is None
    auto.observe(dataclasses.replace(plan, mode="plain"), 5000.0, 1, 0)
    n, d = plan.tree_total_tokens, plan.tree_depth
    # curve(0.5): a k-token target forward costs 30 + 0.5 (k - 1) ms, a draft forward 1 ms
    forwards = 30 + 0.5 * n + (d - 1) * 1.0 + 1.0
    for _ in range(OBSERVED_MIN):
        auto.observe(plan, forwards * slower, 1 + n, 4)
    assert auto.slowdown() == pytest.approx(slower)
    assert auto.apply(proposer).mode == mode


def test_a_settled_lookup_plan_keeps_its_lookups():
    """Only a settled plain plan hands the decode to plain decoding's step; a settled lookup
    plan stops the draft and goes on proposing lookup tokens."""
    from scylla.decoding.hybrid import HybridProposer

    planner = types.SimpleNamespace(settled=lambda plan: True)
    for mode, plain in (("plain", True), ("lookup", False)):
        proposer = types.SimpleNamespace(planner=planner, plan=Plan(mode, lookup_len=4),
                                         calibrating=False)
        assert HybridProposer.plain.fget(proposer) is plain
        assert HybridProposer.drafts.fget(proposer) is False


@pytest.mark.parametrize("slower, kept", [(1.0, 4), (3.0, 0)])
def test_a_settled_lookup_plan_stays_and_its_gate_prices_steps_by_their_timed_kind(
        monkeypatch, slower, kept):
    """A settled lookup plan is not chosen again, however its steps run: its gate decides each
    step from what this decode's steps of each kind took. Lookup steps at their forwards' cost
    keep a chain that comes true half the time; three times slower, the gate verifies the root
    alone, at what root-only steps took."""
    import scylla.decoding.planner as planner
    from scylla.decoding.pld import LookupGate

    monkeypatch.setattr(planner, "measured_costs",
                        lambda *a: curve(per_token_ms=8.0, draft_ms=20.0))
    auto = AutoPlanner(model=None, draft=torch.nn.Linear(3, 2), width=2, ngram=3, batch=1,
                       temperature=0.0)
    hit = dataclasses.replace(step(accepted_depths=0, chain_run=4), match=3)
    auto.steps = [dataclasses.replace(hit, group=i) for i in range(WINDOW)]
    proposer = types.SimpleNamespace(plan=None, lookup_len=0, lookup_min_match=1,
                                     gate=LookupGate(3, 4))
    proposer.plan = plan = auto.start(proposer)
    assert plan.mode == "lookup" and auto.settled(plan) and proposer.lookup_len == 4
    for i in range(2 * WINDOW):
        auto.begin(proposer)
        assert not auto.calibrating
        if i % 2:
            auto.observe(plan, 30.0, 1, 0)  # the root alone: 30 ms by the curve
        else:
            auto.observe(plan, 62.0 * slower, 5, 0)  # 5 nodes: 30 + 8 * 4 ms by the curve
        auto.review(proposer)
        assert proposer.plan is plan
    assert auto.lookup_step_ms(0) == pytest.approx(30.0)
    assert auto.lookup_step_ms(4) == pytest.approx(62.0 * slower)
    gate = proposer.gate
    gate.scored[3], gate.hits[3] = 100, [0, 50, 50, 50, 50]  # half the chains come true whole
    assert gate.cut([[1, 2, 3, 4]], [3], auto.lookup_step_ms) == [[1, 2, 3, 4][:kept]]


def test_a_later_process_starts_from_the_drafts_saved_table(monkeypatch):
    """The calibration table is saved on this machine per draft (by its weights): a new process
    (an empty in-process table) plans at once, calibrating nothing, until the draft changes;
    a damaged file means calibrating again, not an error."""
    import scylla.decoding.planner as planner

    draft = torch.nn.Linear(3, 2)
    calibrated, proposer, auto = drive(monkeypatch, step(accepted_depths=3), CALIBRATION_STEPS,
                                       draft)
    assert all(calibrated) and auto.calibrated == CALIBRATION_STEPS and auto.table.is_file()
    monkeypatch.setattr(planner, "_TABLES", planner.weakref.WeakKeyDictionary())  # new process
    calibrated, again, auto = drive(monkeypatch, step(accepted_depths=0), 10, draft)
    assert not any(calibrated) and auto.calibrated == 0
    assert again.plan == proposer.plan and again.plan.mode == "tree"  # the saved steps' plan
    saved = planner.load_steps(auto.table)
    assert len(saved) == CALIBRATION_STEPS and all(s.group < 0 for s in saved)
    assert np.array_equal(saved[0].accepted, step(accepted_depths=3).accepted)
    monkeypatch.setattr(planner, "_TABLES", planner.weakref.WeakKeyDictionary())
    weight = draft.weight.detach().clone()
    with torch.no_grad():
        draft.weight.add_(1.0)  # another draft: its own (empty) table
    assert drive(monkeypatch, step(accepted_depths=3), 3, draft)[0] == [True] * 3
    auto.table.write_text('[{"scores": [1.0]}]')  # a table of another version of this code
    monkeypatch.setattr(planner, "_TABLES", planner.weakref.WeakKeyDictionary())
    with torch.no_grad():
        draft.weight.copy_(weight)  # the first draft again
    assert drive(monkeypatch, step(accepted_depths=3), 3, draft)[0] == [True] * 3


def test_a_drafting_plan_is_judged_on_its_first_timed_steps(monkeypatch):
    """A tree the curve favours whose steps run far slower than their forwards turns to plain
    decoding after OBSERVED_MIN timed steps, not at its next calibration REPLAN_EVERY
    verifications later; at the predicted cost it stays."""
    for slower, mode in ((1.0, "tree"), (30.0, "plain")):
        _, proposer, auto = drive(monkeypatch, step(accepted_depths=3), CALIBRATION_STEPS)
        plan = proposer.plan
        assert plan.mode == "tree"
        forwards = 30 + 0.5 * plan.tree_total_tokens + (plan.tree_depth - 1) * 1.0 + 1.0
        for i in range(OBSERVED_MIN):
            auto.begin(proposer)
            assert not auto.calibrating
            auto.observe(plan, forwards * slower, 1 + plan.tree_total_tokens, 4)
            auto.review(proposer)
            assert proposer.plan is plan or i == OBSERVED_MIN - 1
        assert proposer.plan.mode == mode and auto.since < REPLAN_EVERY - 1
        assert auto.settled(proposer.plan) is (mode == "plain")


def test_step_time_ratios_are_kept_with_the_cost_curve(monkeypatch):
    """The ratios a decode measured are stored with the cached curve of its batch size: the
    next decode there starts from them (a slow tree is not tried again), one at another batch
    size does not, and a curve measured anew (it expired) starts without them."""
    import scylla.decoding.planner as planner

    measured = []

    def forward_cost(model, ks, **kw):
        measured.append(kw["batch"])
        return [{"k": k, "target_ms": 30 + 0.5 * (k - 1), "draft_ms": 1.0} for k in ks]

    monkeypatch.setattr(planner, "forward_cost", forward_cost)
    monkeypatch.setattr(planner.kernels, "fingerprint", lambda: "test")
    model = types.SimpleNamespace(device="cpu", dtype=torch.float32, config="tiny")
    draft = torch.nn.Linear(3, 2)

    def planner_at(batch):
        auto = AutoPlanner(model=model, draft=draft, width=2, ngram=0, batch=batch,
                           temperature=0.0)
        auto.steps = [dataclasses.replace(step(accepted_depths=3), group=i, batch=batch)
                      for i in range(WINDOW)]
        proposer = types.SimpleNamespace(plan=None, lookup_len=0, lookup_min_match=1,
                                         drafter=types.SimpleNamespace(set_shape=id))
        proposer.plan = auto.start(proposer)
        return auto, proposer

    auto, proposer = planner_at(4)
    assert proposer.plan.mode == "tree" and auto.slowdown() is None and measured == [4]
    for _ in range(OBSERVED_MIN):
        auto.observe(proposer.plan, 5000.0, 1 + proposer.plan.tree_total_tokens, 4)
        auto.review(proposer)
    assert proposer.plan.mode == "plain"
    again, proposer = planner_at(4)  # the next decode at batch 4: the curve's cache, its ratios
    assert measured == [4] and again.slowdown() == pytest.approx(auto.slowdown())
    assert proposer.plan.mode == "plain" and again.settled(proposer.plan)
    other, proposer = planner_at(1)
    assert measured == [4, 1] and other.slowdown() is None and proposer.plan.mode == "tree"
    record = json.loads(again.costs.path.read_text())
    again.costs.path.write_text(json.dumps({**record, "measured": record["measured"] - 2 * 3600}))
    fresh, proposer = planner_at(4)
    assert measured == [4, 1, 4] and fresh.slowdown() is None and proposer.plan.mode == "tree"
