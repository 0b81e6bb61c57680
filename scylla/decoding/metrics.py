"""Decoding metrics derived from raw counts (RowStats), always as ratios of sums.

- ``decode/tau``: new tokens / target forwards (the bonus token included; plain = 1).
- ``decode/alpha``: accepted / tested draft tokens, where a draft token is tested when every
  token before it on the path was accepted; ``decode/alpha_at_{i}`` the same at draft
  position i (0 = the first draft token after the root).
- ``decode/tokens_per_s``: new tokens / wall seconds (per category: over the rows' shares).
- the accepted-length histogram: how many target forwards emitted n tokens.
- ``decode/plan_*``: with ``--tree auto``, the planner's choice and its predicted τ and speed-up;
  ``decode/plan_calibrated`` counts the row-steps this decode spent calibrating (0 when the
  draft's table was known: ``scylla.decoding.planner``).
- ``<metric>_ci_low`` / ``_ci_high`` for ``decode/tau``, ``decode/alpha`` and
  ``decode/alpha_at_0``: a 95% percentile bootstrap over the prompts (``prompt_ci``), the
  width another draw of as many prompts from the same pool would show.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

from scylla.decoding.result import DecodeResult, RowStats


def accepted_histogram(stats: Iterable[RowStats]) -> dict[int, int]:
    """{tokens emitted by one target forward: how many forwards} (prefills included)."""
    hist: dict[int, int] = defaultdict(int)
    for s in stats:
        for n in s.accepted_lengths:
            hist[n] += 1
    return dict(sorted(hist.items()))


def summarize(stats: Iterable[RowStats], seconds: float | None = None) -> dict[str, float]:
    """Metrics over rows; ``seconds`` the wall time they took (default: their shares)."""
    stats = list(stats)
    new = sum(s.new_tokens for s in stats)
    forwards = sum(s.target_forwards for s in stats)
    proposed = sum(s.proposed for s in stats)
    out = {"decode/new_tokens": float(new), "decode/target_forwards": float(forwards),
           "decode/draft_forwards": float(sum(s.draft_forwards for s in stats)),
           "decode/tau": new / max(1, forwards),
           "decode/alpha": sum(s.accepted for s in stats) / proposed if proposed else float("nan")}
    depth = max((len(s.proposed_at) for s in stats), default=0)
    for i in range(depth):
        tested = sum(s.proposed_at[i] for s in stats if i < len(s.proposed_at))
        hit = sum(s.accepted_at[i] for s in stats if i < len(s.accepted_at))
        out[f"decode/alpha_at_{i}"] = hit / tested if tested else float("nan")
    wall = sum(s.seconds for s in stats) if seconds is None else seconds
    out["decode/seconds"] = wall
    out["decode/tokens_per_s"] = new / wall if wall > 0 else float("nan")
    return out


# prompt resamples behind a CI: the 2.5% / 97.5% quantiles of 2,000 draws move by ~0.5% of
# the interval's width from one seed to another
PROMPT_RESAMPLES = 2000
PROMPT_CI = 0.95


def prompt_ci(stats: Iterable[RowStats], seed: int = 0) -> dict[str, float]:
    """Percentile-bootstrap CIs of the ratio metrics over prompts: the rows are resampled with
    replacement and each ratio of sums recomputed (``decode/tau_ci_low`` ...). {} for fewer
    than two rows; a metric none of whose rows tested anything is left out."""
    stats = list(stats)
    if len(stats) < 2:
        return {}
    parts = {"decode/tau": ([s.new_tokens for s in stats], [s.target_forwards for s in stats]),
             "decode/alpha": ([s.accepted for s in stats], [s.proposed for s in stats]),
             "decode/alpha_at_0": ([s.accepted_at[0] if s.accepted_at else 0 for s in stats],
                                   [s.proposed_at[0] if s.proposed_at else 0 for s in stats])}
    draws = np.random.default_rng(seed).integers(0, len(stats), (PROMPT_RESAMPLES, len(stats)))
    out = {}
    for name, (num, den) in parts.items():
        top, bottom = np.asarray(num)[draws].sum(1), np.asarray(den)[draws].sum(1)
        ratio = top[bottom > 0] / bottom[bottom > 0]
        if len(ratio) and np.asarray(den).sum() > 0:
            low, high = np.quantile(ratio, [(1 - PROMPT_CI) / 2, (1 + PROMPT_CI) / 2])
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(low), float(high)
    return out


def result_metrics(result: DecodeResult) -> dict[str, float]:
    """``summarize`` over a whole call, timed by its wall clock, with its time split."""
    out = summarize(result.stats, result.seconds.get("total"))
    out.update(prompt_ci(result.stats))
    for part in ("draft", "verify", "other"):
        if part in result.seconds:
            out[f"decode/seconds_{part}"] = result.seconds[part]
    return out


def by_category(result: DecodeResult, categories: list[str]) -> dict[str, dict[str, float]]:
    """``summarize`` per category (categories[i] is prompt i's)."""
    groups: dict[str, list[RowStats]] = defaultdict(list)
    for cat, s in zip(categories, result.stats):
        groups[cat].append(s)
    return {cat: summarize(rows) for cat, rows in sorted(groups.items())}


# the planner's numbers, logged as ``decode/plan_<name>`` (the prediction beside the measurement)
PLAN_NUMBERS = ("tree_total_tokens", "tree_depth", "lookup_len", "lookup_min_match", "tau",
                "speedup", "calibration_steps", "plans", "calibrated")

# the per-category metrics, logged as ``<name>/<category>`` (``decode/tau/writing``)
PER_CATEGORY = ("decode/tau", "decode/alpha", "decode/tokens_per_s")


def decode_metrics(result: DecodeResult, categories: list[str] | None = None,
                   speedup: float | None = None, exact_match: bool | None = None
                   ) -> dict[str, float]:
    """Every ``decode/*`` metric of one call, as the decode stage logs it: ``result_metrics``,
    ``PER_CATEGORY`` per category, and the comparisons with plain decoding measured in the
    same run (``decode/speedup``, ``decode/exact_match``). NaN values (the alpha of a method
    that proposes nothing) are left out: MLflow cannot log them."""
    out = result_metrics(result)
    for cat, values in by_category(result, categories or []).items():
        out.update({f"{k}/{cat}": values[k] for k in PER_CATEGORY})
    if speedup is not None:
        out["decode/speedup"] = speedup
    if exact_match is not None:
        out["decode/exact_match"] = float(exact_match)
    if result.plan:  # the planner's choice and its prediction
        out.update({f"decode/plan_{k}": float(result.plan[k]) for k in PLAN_NUMBERS})
        out["decode/plan_speculates"] = float(result.plan["mode"] != "plain")
    return {k: v for k, v in out.items() if v == v}
