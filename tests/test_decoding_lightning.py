"""Decoding as a Lightning test loop: same tokens as a direct call; the decode metrics are
ratios of summed raw counts, overall and per category."""
from __future__ import annotations

import pytest
from decoding_fixtures import OracleDraft, prompts_of, tiny_target

from scylla.config import DecodeConfig
from scylla.decoding import METHODS
from scylla.decoding.evaluation import evaluate
from scylla.decoding.metrics import decode_metrics


def test_lightning_loop_matches_direct_call_and_metrics_sum_raw_counts():
    target = tiny_target(96)
    prompts = prompts_of([5, 8, 3, 7, 6], 96)
    cfg = DecodeConfig(method="tree", max_new_tokens=12, decode_batch_size=2, tree_top_k=2,
                       tree_depth=3, tree_total_tokens=5)
    draft = OracleDraft(target)
    direct = METHODS["tree"](target, prompts, cfg, draft)
    res = evaluate(target, prompts, cfg, draft, prompts_per_step=3, accelerator="cpu")
    assert res.tokens == direct.tokens
    cats = ["qa", "math", "qa", "qa", "math"]
    m = decode_metrics(res, cats, speedup=1.5, exact_match=True)
    for cat in ("qa", "math"):
        rows = [s for c, s in zip(cats, res.stats) if c == cat]
        want = sum(s.new_tokens for s in rows) / sum(s.target_forwards for s in rows)
        assert m[f"decode/tau/{cat}"] == pytest.approx(want)
    assert m["decode/new_tokens"] == sum(len(t) for t in res.tokens)
    assert m["decode/tau"] == pytest.approx(m["decode/new_tokens"] / m["decode/target_forwards"])
    assert res.tau > 2 and m["decode/speedup"] == 1.5 and m["decode/exact_match"] == 1.0
    # plain decoding proposes nothing: its alpha is NaN, which is left out rather than logged
    plain = decode_metrics(METHODS["plain"](target, prompts, cfg, None), cats)
    assert "decode/alpha" not in plain and plain["decode/tau"] == 1.0
