"""T > 0 on the real target: speculative sampling with the shipped draft reproduces
SmolLM2-135M-Instruct's own sampling distribution.

Every method samples the first three new tokens of one short prompt SAMPLES times (each row an
independent sample; the prompt is raw text, no chat template, because every row is prefilled
and the prefill is most of the test's time). The exact target probability of a token triple is
q(t1) q(t2 | t1) q(t3 | t1, t2), computed here by target forwards over every prefix likely
enough to matter, so the test is one-sample: a Pearson chi-square of the observed triples
against the exact probabilities, triples expected fewer than 5 times pooled into one bin. The
first token comes from the prefill; the second and third are the ones the draft proposes and
the verifier accepts or replaces, so the triple is where a wrong acceptance rule shows.

A correct sampler fails one run in a thousand seeds (ALPHA); the seed is fixed. Negative
control: the acceptance test run against the wrong draft distribution (``broken``, the bug of
``test_sampling_lossless``) must fail with p < 1e-6, so the test has the power to see it at
this sample size on the real target.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_sampling_lossless import broken

import scylla.decoding.engine as engine
from scylla.config import DecodeConfig
from scylla.decoding import METHODS, sampling
from scylla.decoding.verify import verify_sampled

pytestmark = [pytest.mark.real, pytest.mark.slow]
ALPHA = 1e-3
SAMPLES = 2000
TEMPERATURE = 0.7  # as in the T > 0 bench run of docs/benchmark.md
# text whose continuation copies it: prompt lookup proposes real chains
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
ENOUGH = 1.0  # prefixes expected at least this often get their next-token distribution


@pytest.fixture(scope="module")
def real():
    from scylla.drafts.io import from_pretrained
    from scylla.modeling.targets import load_target

    target = load_target("smollm2-135m-instruct")
    draft = from_pretrained(os.environ.get("SCYLLA_TEST_DRAFT", "default"), target)
    prompt = list(target.tokenizer.encode(TEXT))
    return target, draft, prompt, exact_triples(target.model, prompt)


@torch.inference_mode()
def next_probs(model, prefixes: list[list[int]]) -> torch.Tensor:
    """(P, V) the target's sampling distribution after each prefix (all of one length)."""
    out = []
    for i in range(0, len(prefixes), 64):
        logits = model(torch.tensor(prefixes[i:i + 64])).logits[:, -1]
        out.append(sampling.probs(logits, TEMPERATURE))
    return torch.cat(out).double()


def exact_triples(model, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """The exact probability of every triple whose prefixes are expected ``ENOUGH`` times in
    SAMPLES draws (the others are only ever seen in the pooled bin)."""
    level: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        prefixes = [k for k, p in level.items() if p * SAMPLES >= ENOUGH]
        nxt: dict[tuple[int, ...], float] = {}
        probs = next_probs(model, [prompt + list(k) for k in prefixes])
        for k, q in zip(prefixes, probs):
            top = torch.nonzero(q * level[k] * SAMPLES >= ENOUGH / 10).flatten().tolist()
            for t in top:
                nxt[k + (t,)] = level[k] * float(q[t])
        level = nxt
    return level


def chi_square_pvalue(observed: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]
                      ) -> float:
    from scipy.stats import chi2

    n = len(observed)
    big = {k: p * n for k, p in exact.items() if p * n >= 5}
    counts = dict.fromkeys(big, 0)
    for k in observed:
        if k in counts:
            counts[k] += 1
    obs = list(counts.values()) + [n - sum(counts.values())]
    exp = list(big.values()) + [n - sum(big.values())]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return float(chi2.sf(stat, len(obs) - 1))


def sample(real, method: str) -> list[tuple[int, ...]]:
    target, draft, prompt, _ = real
    torch.set_num_threads(2)  # the 135M target on thousands of rows (conftest restores 1)
    # tree="fixed": these shapes, not the planner's (which times forwards at this batch size)
    cfg = DecodeConfig(method=method, max_new_tokens=3, decode_batch_size=250,
                       temperature=TEMPERATURE, seed=7, draft_len=3, tree_top_k=3,
                       tree_depth=3, tree_total_tokens=8, tree="fixed")
    res = METHODS[method](target, [prompt] * SAMPLES, cfg, draft)
    assert all(len(t) == 3 for t in res.tokens)  # no EOS within three tokens of this answer
    return [tuple(t) for t in res.tokens]


@pytest.mark.parametrize("method", ["plain", "chain", "tree", "pld", "hybrid"])
def test_real_target_samples_follow_the_target(real, method):
    p = chi_square_pvalue(sample(real, method), real[3])
    assert p > ALPHA, p


@pytest.mark.parametrize("method", ["chain", "hybrid"])
def test_a_broken_acceptance_rule_fails_on_the_real_target(real, monkeypatch, method):
    monkeypatch.setattr(engine, "verify_sampled", broken(verify_sampled))
    p = chi_square_pvalue(sample(real, method), real[3])
    assert p < 1e-6, p
