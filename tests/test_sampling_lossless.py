"""T > 0: speculative sampling reproduces the target's sampling distribution.

Statistics: Pearson chi-square of observed counts against the *exact* target distribution
(computed by enumerating the tiny vocabulary), bins with an expected count below 5 pooled.
A correct sampler passes with probability 1 - ALPHA for any seed; the seeds are fixed, so the
suite is deterministic. Each test also runs a deliberately broken sampler (the draft
probabilities the acceptance test divides by replaced by a uniform distribution, a classic
bug) and requires it to fail clearly: the test has the power to see a wrong distribution.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from decoding_fixtures import BOS, OracleDraft, random_draft, tiny_target
from scipy.stats import chi2

import scylla.decoding.engine as engine
from scylla.config import DecodeConfig
from scylla.decoding import METHODS, sampling
from scylla.decoding.tree import Candidates, Tree
from scylla.decoding.verify import verify_sampled

ALPHA = 1e-3  # a correct sampler fails one run in a thousand seeds
V = 24
PROMPT = [BOS, 5, 9]
SAMPLES = 6000


def chi_square_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """counts (K,) observed, expected_p (K,) exact probabilities; low-expectation bins pooled."""
    n = counts.sum()
    exp = expected_p.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    exp = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def broken(verify):
    """The bug the tests must catch: acceptance ratios against the wrong draft distribution."""
    def wrong(tree, q, cands, generator=None):
        if cands.probs is not None:
            cands = dataclasses.replace(cands, probs=torch.full_like(cands.probs,
                                                                     1.0 / cands.probs.shape[-1]),
                                        fixed=None)
        else:  # deterministic proposals: pretend they were drawn uniformly
            cands = dataclasses.replace(
                cands, probs=torch.full((*cands.tokens.shape[:2], q.shape[-1]), 1.0 / q.shape[-1]),
                dist_of=torch.arange(cands.tokens.shape[1]).expand(cands.tokens.shape[:2]))
        return verify(tree, q, cands, generator)
    return wrong


# --- the verifier alone: one node with several candidates drawn without replacement ---------

def one_node_case(rows: int, seed: int):
    """A root with 3 candidates (2 in the tree, 1 pruned) and exact q, p over 6 tokens."""
    g = torch.Generator().manual_seed(seed)
    q_root = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    p_root = torch.tensor([0.05, 0.40, 0.05, 0.30, 0.15, 0.05])
    q_child = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])
    logp = p_root.log().expand(rows, -1)
    ids, _ = sampling.sample_without_replacement(logp, 3, g)  # (R, 3) draw order
    tokens = torch.cat([torch.zeros(rows, 1, dtype=torch.long), ids[:, :2]], 1)  # root + 2
    tree = Tree(tokens=tokens, parents=torch.tensor([-1, 0, 0]).expand(rows, -1),
                depth=torch.tensor([0, 1, 1]).expand(rows, -1),
                valid=torch.ones(rows, 3, dtype=torch.bool), max_depth=1)
    none = [-1, -1, -1]
    cands = Candidates(tokens=torch.stack([ids, ids, ids], 1),  # (R, N=3, C=3)
                       node=torch.tensor([[1, 2, -1], none, none]).expand(rows, -1, -1),
                       ok=torch.tensor([[True] * 3, [False] * 3, [False] * 3]).expand(rows, -1, -1),
                       probs=p_root.expand(rows, 1, -1),
                       dist_of=torch.tensor([0, -1, -1]).expand(rows, -1))
    q = torch.stack([q_root, q_child, q_child]).expand(rows, -1, -1)
    return tree, q, cands, q_root, q_child, g


def with_lookup_first(tree: Tree, cands: Candidates, token: int) -> tuple[Tree, Candidates]:
    """The hybrid's case: a fixed lookup candidate (node 3) tested before the root's draws."""
    rows = len(tree.tokens)
    tree = Tree(tokens=torch.cat([tree.tokens, torch.full((rows, 1), token)], 1),
                parents=torch.tensor([-1, 0, 0, 0]).expand(rows, -1),
                depth=torch.tensor([0, 1, 1, 1]).expand(rows, -1),
                valid=torch.ones(rows, 4, dtype=torch.bool), max_depth=1)
    pad = lambda x, v: torch.cat([x, torch.full_like(x[:, :1], v)], 1)  # noqa: E731 (one node)
    first = lambda x, v: torch.cat([torch.full_like(x[..., :1], v), x], -1)  # noqa: E731
    node = pad(first(cands.node, -1), -1)
    node[:, 0, 0] = 3
    ok = pad(first(cands.ok, False), False)
    ok[:, 0, 0] = True
    fixed = torch.zeros_like(ok)
    fixed[:, 0, 0] = True
    return tree, Candidates(tokens=pad(first(cands.tokens, token), token), node=node, ok=ok,
                            probs=cands.probs, dist_of=pad(cands.dist_of, -1), fixed=fixed)


@pytest.mark.parametrize("deterministic", ["drawn", "fixed", "fixed-then-drawn"])
@pytest.mark.parametrize("verify,should_pass", [(verify_sampled, True),
                                                (broken(verify_sampled), False)])
def test_verifier_emits_target_samples(verify, should_pass, deterministic):
    """fixed: candidates proposed with probability 1 (prompt lookup); fixed-then-drawn: a
    lookup candidate before the draft's draws of the same node (the hybrid's tree)."""
    tree, q, cands, q_root, q_child, g = one_node_case(40000, seed=0)
    if deterministic == "fixed":
        fixed = torch.tensor([1, 3, 4])
        tree.tokens = torch.cat([tree.tokens[:, :1], fixed[:2].expand(len(tree.tokens), -1)], 1)
        cands = dataclasses.replace(cands, tokens=fixed.expand(cands.tokens.shape).clone(),
                                    probs=None)
    elif deterministic == "fixed-then-drawn":
        tree, cands = with_lookup_first(tree, cands, token=1)
        q = torch.cat([q, q[:, -1:]], 1)
    v = verify(tree, q, cands, g)
    first = torch.bincount(v.tokens[:, 0], minlength=6)
    two = v.count == 2
    second = torch.bincount(v.tokens[two, 1], minlength=6)
    p1, p2 = chi_square_pvalue(first, q_root), chi_square_pvalue(second, q_child)
    if should_pass:
        assert p1 > ALPHA and p2 > ALPHA, (p1, p2)
        assert 0.3 < two.float().mean() < 0.9  # both outcomes are exercised
        assert bool(v.accepted[two, 0].all())
    else:
        assert p1 < 1e-6, p1


# --- end to end: the first tokens of a whole decode ------------------------------------------

@pytest.fixture(scope="module")
def small():
    target = tiny_target(V, hidden=32, init=0.3)
    target.model.config.eos_token_ids = []  # every sample runs the full 3 tokens
    return target


def exact_distributions(model, temperature: float, top_p: float):
    """Exact joint of the first two new tokens (V*V,) and marginal of the third (V,)."""
    with torch.inference_mode():
        p1 = sampling.probs(model(torch.tensor([PROMPT])).logits[0, -1], temperature, top_p)
        ctx2 = torch.tensor([PROMPT + [a] for a in range(V)])
        p2 = sampling.probs(model(ctx2).logits[:, -1], temperature, top_p)  # (V, V)
        joint = p1[:, None] * p2  # (V, V)
        ctx3 = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        p3 = sampling.probs(model(ctx3).logits[:, -1], temperature, top_p)  # (V*V, V)
    return joint.flatten(), (joint.flatten()[:, None] * p3).sum(0)


def sample_three(target, method, draft, temperature, top_p, seed) -> torch.Tensor:
    # tree="fixed": these trees, not the planner's (which would time forwards at 1000 rows)
    cfg = DecodeConfig(method=method, max_new_tokens=3, decode_batch_size=1000,
                       temperature=temperature, sample_top_p=top_p, seed=seed, draft_len=3,
                       tree_top_k=3, tree_depth=3, tree_total_tokens=8,
                       static_tree="0,1,2,00,01,10,000", pld_ngram=1, tree="fixed")
    res = METHODS[method](target, [PROMPT] * SAMPLES, cfg, draft)
    return torch.tensor(res.tokens)  # (S, 3)


# acceptance rates seen: oracle 1.0 (p = q), noisy oracle ~0.6-0.8, random ~0.4
CASES = [("chain", "oracle", 1.0, 1.0), ("chain", "random", 1.0, 1.0),
         ("tree", "noisy", 1.0, 1.0), ("tree", "random", 0.8, 0.9),
         ("static-tree", "noisy", 1.0, 0.9), ("pld", None, 1.0, 1.0),
         ("hybrid", "noisy", 1.0, 1.0), ("hybrid", "random", 0.8, 0.9)]


@pytest.mark.parametrize("method,draft_name,temperature,top_p", CASES)
def test_first_tokens_follow_the_target(small, method, draft_name, temperature, top_p):
    draft = {"oracle": OracleDraft(small), "noisy": OracleDraft(small, noise=1.5),
             "random": random_draft(small), None: None}[draft_name]
    joint, third = exact_distributions(small.model, temperature, top_p)
    toks = sample_three(small, method, draft, temperature, top_p, seed=1)
    p12 = chi_square_pvalue(torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V), joint)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=V), third)
    assert p12 > ALPHA and p3 > ALPHA, (p12, p3)


@pytest.mark.parametrize("method,draft_name", [("chain", "oracle"), ("tree", "oracle"),
                                               ("hybrid", "oracle")])
def test_a_broken_sampler_fails(small, monkeypatch, method, draft_name):
    monkeypatch.setattr(engine, "verify_sampled", broken(verify_sampled))
    joint, _ = exact_distributions(small.model, 1.0, 1.0)
    toks = sample_three(small, method, OracleDraft(small), 1.0, 1.0, seed=1)
    p12 = chi_square_pvalue(torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V), joint)
    assert p12 < 1e-6, p12
