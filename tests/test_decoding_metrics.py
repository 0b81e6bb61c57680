"""Metrics are ratios of sums of raw counts, per call and per category."""
from __future__ import annotations

import math

from decoding_fixtures import OracleDraft, prompts_of, random_draft, tiny_target

from scylla.config import DecodeConfig
from scylla.decoding import METHODS
from scylla.decoding.metrics import (
    accepted_histogram,
    by_category,
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


def test_counts_of_a_real_decode():
    target = tiny_target(96)
    prompts = prompts_of([5, 9, 4], 96)
    for draft, alpha_lo, alpha_hi in ((OracleDraft(target), 0.95, 1.0),
                                      (random_draft(target), 0.0, 0.3)):
        cfg = DecodeConfig(max_new_tokens=16, decode_batch_size=2, draft_len=3)
        res = METHODS["chain"](target, prompts, cfg, draft)
        m = result_metrics(res)
        assert m["decode/tau"] == res.tau
        assert alpha_lo <= m["decode/alpha"] <= alpha_hi
        assert sum(k * v for k, v in accepted_histogram(res.stats).items()) == res.new_tokens
        assert m["decode/seconds"] == res.seconds["total"] > 0
        shares = sum(s.seconds for s in res.stats)  # the rows' shares cover most of the call
        assert 0.5 * res.seconds["total"] < shares <= res.seconds["total"]
        for part in ("draft", "verify", "other"):
            assert m[f"decode/seconds_{part}"] >= 0
