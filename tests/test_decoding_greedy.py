"""T = 0: every speculative method emits exactly plain greedy decoding's tokens, at any batch size.

The tiny target gets an EOS token that one prompt produces early while the others run on, so
rows finish mid-batch and waiting prompts take their slots. Three drafts: an untrained one
(almost every proposal rejected), an oracle (long accepted paths, whole chains) and a noisy
oracle (partial acceptance, branches beyond rank 0).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from decoding_fixtures import OracleDraft, prompts_of, random_draft, tiny_target

from scylla.config import DecodeConfig
from scylla.decoding import METHODS
from scylla.decoding.plain import plain_decode

V = 96
MAX_NEW = 20
LENGTHS = [6, 11, 3, 9, 14, 5, 8]
SPEC = ["chain", "tree", "static-tree", "pld", "hybrid"]


@pytest.fixture(scope="module")
def setup():
    target = tiny_target(V)
    prompts = prompts_of(LENGTHS, V)
    free = plain_decode(target.model, prompts, MAX_NEW, [], decode_batch_size=1).tokens
    eos = free[1][5]  # one row stops early, the others run on
    stops = [t.index(eos) + 1 if eos in t else MAX_NEW for t in free]
    assert min(stops) < MAX_NEW and max(stops) == MAX_NEW
    target.model.config.eos_token_ids = [eos]
    target.eos_token_ids = [eos]
    ref = plain_decode(target.model, prompts, MAX_NEW, [eos], decode_batch_size=1)
    assert [len(t) for t in ref.tokens] == stops
    drafts = {"random": random_draft(target), "oracle": OracleDraft(target),
              "noisy": OracleDraft(target, noise=3.0)}
    return target, prompts, ref, drafts


def cfg_for(method: str, batch: int, **kw) -> DecodeConfig:
    base = dict(method=method, max_new_tokens=MAX_NEW, decode_batch_size=batch, draft_len=4,
                tree="fixed", tree_top_k=3, tree_depth=4, tree_total_tokens=9,
                static_tree="0,1,2,00,01,10,000,0000", pld_ngram=2)
    return DecodeConfig(**{**base, **kw})


@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("method", SPEC)
def test_equals_plain_greedy(setup, method, batch):
    target, prompts, ref, drafts = setup
    for name in (["random", "oracle", "noisy"] if method != "pld" else ["none"]):
        res = METHODS[method](target, prompts, cfg_for(method, batch), drafts.get(name))
        assert res.tokens == ref.tokens, f"{method} batch={batch} draft={name}"
        assert res.new_tokens == ref.new_tokens
        if name == "oracle":  # the oracle's chains/trees are accepted nearly whole
            assert res.tau > 3.0, (method, res.tau)
        if name == "random":
            assert res.tau < 1.5


@pytest.mark.parametrize("method", SPEC)
def test_batched_rows_equal_one_by_one(setup, method):
    """Not only the tokens: every row's accepted lengths and counts are its own."""
    target, prompts, _, drafts = setup
    draft = drafts["noisy"]
    one = METHODS[method](target, prompts, cfg_for(method, 1), draft)
    many = METHODS[method](target, prompts, cfg_for(method, 8), draft)
    assert many.tokens == one.tokens
    for a, b in zip(one.stats, many.stats):
        assert dataclasses.replace(a, seconds=0.0) == dataclasses.replace(b, seconds=0.0)
        assert a.seconds > 0 and b.seconds > 0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["tree", "hybrid"])
def test_planned_trees_equal_plain_greedy(setup, method, batch, tmp_path, monkeypatch):
    """--tree auto: calibration, then the planner's tree (or none), still exact. A 16-row-step
    calibration window, so that these short decodes also re-plan."""
    import scylla.decoding.planner as planner

    monkeypatch.setattr(planner, "CALIBRATION_STEPS", 16)
    monkeypatch.setattr(planner, "WINDOW", 16)
    target, prompts, ref, drafts = setup
    for name in ("random", "oracle", "noisy"):
        res = METHODS[method](target, prompts * 3, cfg_for(method, batch, tree="auto"),
                              drafts[name])
        assert res.tokens == ref.tokens * 3, f"{method} batch={batch} draft={name}"
        assert res.plan["calibration_steps"] >= 16 and res.plan["mode"] in (
            "plain", "lookup", "tree", "hybrid")
        if (method, name) == ("tree", "random"):  # nothing pays: plain decoding's own step
            assert res.plan["mode"] == "plain" and res.plan["plans"] == 1
    assert list(tmp_path.glob("plans/costs-*.json"))


def test_oracle_chain_accepts_everything_and_counts_add_up(setup):
    target, prompts, ref, drafts = setup
    res = METHODS["chain"](target, prompts, cfg_for("chain", 3), drafts["oracle"])
    for s, toks in zip(res.stats, ref.tokens):
        assert sum(s.accepted_lengths) == s.new_tokens == len(toks)
        assert len(s.accepted_lengths) == s.target_forwards
        # a full chain of 4 drafts + the bonus per step, except where the output ends
        assert max(s.accepted_lengths) == 5
        assert s.accepted == sum(s.accepted_at) and s.proposed == sum(s.proposed_at)
        assert s.draft_forwards == 1 + 4 * (s.target_forwards - 1)  # prefill + per step
    assert set(res.seconds) == {"draft", "verify", "other", "total"}
    assert res.seconds["total"] >= res.seconds["draft"] + res.seconds["verify"]


def test_pruned_vocab_and_eagle3_drafts(setup):
    """A draft over a pruned vocabulary (d2t map) and an eagle3 draft (fused hidden layers)."""
    target, prompts, ref, _ = setup
    d2t = torch.arange(3, V, 2)  # odd ids >= 3 only: the target's tokens are often missing
    for draft in (random_draft(target, d2t=d2t), random_draft(target, kind="eagle3")):
        for method in ("chain", "tree"):
            res = METHODS[method](target, prompts, cfg_for(method, 3), draft)
            assert res.tokens == ref.tokens


def test_depth_one_and_wide_trees(setup):
    target, prompts, ref, drafts = setup
    for kw in (dict(method="chain", draft_len=1), dict(method="tree", tree_depth=1),
               dict(method="tree", tree_top_k=8, tree_depth=3, tree_total_tokens=40),
               dict(method="static-tree", static_tree="0,1,2,3,4,5")):
        cfg = dataclasses.replace(cfg_for(kw.pop("method"), 3), **kw)
        res = METHODS[cfg.method](target, prompts, cfg, drafts["noisy"])
        assert res.tokens == ref.tokens, kw
