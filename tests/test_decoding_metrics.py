"""Metrics are ratios of sums of raw counts, per call and per category."""
from __future__ import annotations

import math

import pytest
from decoding_fixtures import OracleDraft, prompts_of, random_draft, tiny_target

from scylla.config import DecodeConfig
from scylla.decoding import METHODS
from scylla.decoding.metrics import (
    accepted_histogram,
    by_category,
    decode_metrics,
    prompt_ci,
    result_metrics,
    summarize,
)
from scylla.decoding.result import DecodeResult, RowStats


def row(lengths, tested, accepted, seconds=1.0):
    return RowStats(new_tokens=sum(lengths), target_forwards=len(lengths), draft_forwards=3,
                    accepted_lengths=list(lengths), proposed=sum(tested), accepted=sum(accepted),
                    proposed_at=list(tested), accepted_at=list(accepted), seconds=seconds)


def test_ratios_of_sums_not_means_of_ratios():
    a = row([1, 4, 4], tested=[2, 2, 2], accepted=[2, 2, 2], seconds=1.0)  # tau 3
    b = row([1, 1, 1, 1, 1, 1], tested=[5, 0], accepted=[0, 0], seconds=3.0)  # tau 1
    m = summarize([a, b])
    assert m["decode/tau"] == 15 / 9  # not (3 + 1) / 2
    assert m["decode/alpha"] == 6 / 11
    assert m["decode/alpha_at_0"] == 2 / 7 and m["decode/alpha_at_1"] == 1.0
    assert m["decode/tokens_per_s"] == 15 / 4 and m["decode/draft_forwards"] == 6
    assert accepted_histogram([a, b]) == {1: 7, 4: 2}
    cats = by_category(DecodeResult([[]] * 3, [a, b, a]), ["qa", "math", "qa"])
    assert cats["qa"]["decode/tau"] == 3.0 and cats["math"]["decode/tau"] == 1.0
    assert math.isnan(summarize([RowStats()])["decode/alpha"])


def test_decode_metrics_of_known_counts_per_call_and_category():
    """Every number the decode stage logs, from counts chosen by hand; NaN ones left out."""
    qa = RowStats(new_tokens=6, target_forwards=3, draft_forwards=4, accepted_lengths=[3, 1, 2],
                  proposed=6, accepted=3, proposed_at=[3, 2, 1], accepted_at=[2, 1, 0],
                  seconds=2.0)
    qa2 = RowStats(new_tokens=4, target_forwards=2, draft_forwards=2, accepted_lengths=[1, 3],
                   proposed=2, accepted=2, proposed_at=[1, 1, 0, 0], accepted_at=[1, 1, 0, 0],
                   seconds=0.5)
    math_row = RowStats(new_tokens=2, target_forwards=2, accepted_lengths=[1, 1], seconds=1.5)
    res = DecodeResult([[7] * 6, [7] * 4, [7] * 2], [qa, qa2, math_row],
                       seconds={"total": 5.0, "draft": 1.0, "verify": 3.0, "other": 1.0})
    m = decode_metrics(res, ["qa", "qa", "math"], speedup=1.25, exact_match=False)
    cis = {k: m.pop(k) for k in list(m) if "_ci_" in k}  # prompt_ci's, tested below
    assert sorted(cis) == sorted(f"decode/{k}_ci_{e}" for k in ("tau", "alpha", "alpha_at_0")
                                 for e in ("low", "high"))
    assert m == pytest.approx({
        "decode/new_tokens": 12.0, "decode/target_forwards": 7.0, "decode/draft_forwards": 6.0,
        "decode/tau": 12 / 7, "decode/alpha": 5 / 8,
        "decode/alpha_at_0": 3 / 4, "decode/alpha_at_1": 2 / 3, "decode/alpha_at_2": 0 / 1,
        # alpha_at_3: nothing tested at position 3, NaN, not logged
        "decode/seconds": 5.0, "decode/tokens_per_s": 12 / 5.0,  # the call's wall clock
        "decode/seconds_draft": 1.0, "decode/seconds_verify": 3.0, "decode/seconds_other": 1.0,
        "decode/tau/qa": 10 / 5, "decode/alpha/qa": 5 / 8,
        "decode/tokens_per_s/qa": 10 / 2.5,  # over the rows' shares of the wall clock
        "decode/tau/math": 2 / 2, "decode/tokens_per_s/math": 2 / 1.5,  # math proposes nothing
        "decode/speedup": 1.25, "decode/exact_match": 0.0})
    assert summarize([qa])["decode/tau"] == 6 / 3  # accepted lengths [3, 1, 2]
    # a planned call (--tree auto): the plan's numbers beside the measured ones; it
    # proposes nothing here, so no alpha, and no comparison was asked for
    plan = {"mode": "hybrid", "tree_total_tokens": 8, "tree_depth": 3, "lookup_len": 2,
            "lookup_min_match": 2, "tau": 2.5, "speedup": 1.5, "calibration_steps": 4,
            "plans": 3, "calibrated": 0}
    one = RowStats(new_tokens=1, target_forwards=1, accepted_lengths=[1])
    planned = decode_metrics(DecodeResult([[7]], [one], {"total": 2.0}, plan))
    assert planned == pytest.approx({
        "decode/new_tokens": 1.0, "decode/target_forwards": 1.0, "decode/draft_forwards": 0.0,
        "decode/tau": 1.0, "decode/seconds": 2.0, "decode/tokens_per_s": 0.5,
        "decode/plan_tree_total_tokens": 8.0, "decode/plan_tree_depth": 3.0,
        "decode/plan_lookup_len": 2.0, "decode/plan_tau": 2.5, "decode/plan_speedup": 1.5,
        "decode/plan_lookup_min_match": 2.0, "decode/plan_plans": 3.0,
        "decode/plan_calibration_steps": 4.0, "decode/plan_calibrated": 0.0,
        "decode/plan_speculates": 1.0})
    plain_plan = DecodeResult([[7]], [one], {"total": 2.0}, {**plan, "mode": "plain"})
    assert decode_metrics(plain_plan)["decode/plan_speculates"] == 0.0


def test_counts_of_a_real_decode():
    target = tiny_target(96)
    prompts = prompts_of([5, 9, 4], 96)
    taus = []
    for draft, alpha_lo, alpha_hi in ((OracleDraft(target), 0.95, 1.0),
                                      (random_draft(target), 0.0, 0.3)):
        cfg = DecodeConfig(max_new_tokens=16, decode_batch_size=2, draft_len=3)
        res = METHODS["chain"](target, prompts, cfg, draft)
        m = result_metrics(res)
        hist = accepted_histogram(res.stats)
        # tau from the tokens returned and the forwards that emitted them, counted apart
        emitted = sum(len(t) for t in res.tokens)
        assert sum(k * v for k, v in hist.items()) == emitted == m["decode/new_tokens"]
        assert m["decode/tau"] == emitted / sum(hist.values())
        assert max(hist) <= cfg.draft_len + 1
        assert alpha_lo <= m["decode/alpha"] <= alpha_hi
        taus.append(m["decode/tau"])
        assert m["decode/seconds"] == res.seconds["total"] > 0
        shares = sum(s.seconds for s in res.stats)  # the rows' shares cover most of the call
        assert 0.5 * res.seconds["total"] < shares <= res.seconds["total"]
        for part in ("draft", "verify", "other"):
            assert m[f"decode/seconds_{part}"] >= 0
    assert taus[0] > 2 and taus[1] < 1.5  # the oracle's drafts are accepted, random ones not


def test_prompt_bootstrap_brackets_the_ratio_and_narrows_with_more_prompts():
    """Half the prompts accept 3 tokens a step, half 1: the CI holds the pooled τ 2, excludes
    both halves' values, and is about half as wide with 4x the prompts; prompts that all agree
    have no width, one prompt has no CI."""
    def cis(n):
        rows = [row([3] * 10 if i % 2 else [1] * 10, tested=[4, 2], accepted=[2 + i % 2, 0])
                for i in range(n)]
        return summarize(rows)["decode/tau"], prompt_ci(rows)

    tau, few = cis(16)
    _, many = cis(64)
    assert tau == 2.0 and 1.0 < few["decode/tau_ci_low"] < 2.0 < few["decode/tau_ci_high"] < 3.0
    width = {n: c["decode/tau_ci_high"] - c["decode/tau_ci_low"] for n, c in ((16, few),
                                                                             (64, many))}
    assert 1.6 < width[16] / width[64] < 2.5
    assert few["decode/alpha_at_0_ci_low"] < 0.625 < few["decode/alpha_at_0_ci_high"]
    same = prompt_ci([row([2] * 5, tested=[1], accepted=[1])] * 8)
    assert same["decode/tau_ci_low"] == same["decode/tau_ci_high"] == 2.0
    assert prompt_ci([row([2] * 5, tested=[1], accepted=[1])]) == {}
    assert "decode/tau_ci_low" in result_metrics(DecodeResult(tokens=[[1], [2]], stats=[
        row([2], [1], [1]), row([1], [1], [0])]))
