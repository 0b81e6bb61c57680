"""Decoding methods side by side: same prompts, same process, same machine.

Each method gets one untimed warm-up call, then decodes every prompt. Reported per method:
tokens/s, new tokens, target forwards, τ (new tokens / target forwards), speed-up over
``plain`` measured in the same run, and whether its tokens equal plain greedy decoding exactly
(at T=0). A mismatch is shown with the target's top-1/top-2 logit gap where the outputs first
differ: a gap near zero is a numerical near-tie, anything else is a bug. Our methods run as a
Lightning test loop (``scylla.decoding.evaluation``) on the target's device; the transformers
peers call ``generate``. The command: ``scylla bench`` (``scylla.commands.bench``).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats

from scylla.config import DecodeConfig
from scylla.data.prompts import prompt_ids
from scylla.decoding.evaluation import evaluate
from scylla.decoding.hf_peers import hf_generate
from scylla.decoding.methods import DRAFTED, METHODS
from scylla.decoding.metrics import by_category, decode_metrics
from scylla.decoding.result import DecodeResult
from scylla.errors import ConfigError, DataError

PEERS = ("hf", "hf-assisted-pld")


@dataclass
class MethodReport:
    method: str
    tokens_per_s: float
    new_tokens: int
    target_forwards: int
    tau: float
    seconds: float
    exact_match: bool | None  # None at T > 0, where exact equality is not expected
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    speedup: float | None = None
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds_split: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # decode_metrics: what MLflow logs
    # names the output tokens, so runs on other commits or machines can be compared exactly
    tokens_sha256: str = ""
    plan: dict[str, Any] = field(default_factory=dict)  # the planner's choice (--tree auto)
    repeat: int = 1  # the round of an interleaved, repeated measurement (``measure``)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def logit_gap(model: Any, context: list[int]) -> tuple[float, int, int]:
    """Top-1 minus top-2 logit of the target after ``context`` (fp32 full forward)."""
    device = next(model.parameters()).device
    out = model(torch.tensor([context], device=device))
    logits = out.logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


def compare(result: DecodeResult, reference: DecodeResult, prompts: list[list[int]],
            hf_model: Callable[[], Any]) -> list[dict[str, Any]]:
    """Mismatches against the reference; ``hf_model()`` is only called (and the HF model only
    loaded) when there is a differing token whose logit gap to report."""
    out = []
    for i, (got, ref) in enumerate(zip(result.tokens, reference.tokens)):
        pos = first_difference(got, ref)
        if pos is None:
            continue
        row: dict[str, Any] = {"prompt": i, "position": pos}
        if pos < min(len(got), len(ref)):
            gap, t1, t2 = logit_gap(hf_model(), prompts[i] + ref[:pos])
            row.update(logit_gap=gap, reference_token=ref[pos], method_token=got[pos],
                       target_top2=[t1, t2])
        out.append(row)
    return out


def vocab_coverage(draft: Any, reference: DecodeResult) -> float | None:
    """The share of the reference's output tokens (plain decoding's) inside the draft's pruned
    vocabulary: a drafted token outside it can never be proposed, so this caps acceptance.
    None for a draft over the full vocabulary (or no draft)."""
    d2t = getattr(draft, "d2t", None)
    tokens = [t for row in reference.tokens for t in row]
    if d2t is None or not tokens:
        return None
    inside = torch.zeros(int(max(tokens + d2t.tolist())) + 1, dtype=torch.bool)
    inside[d2t.cpu()] = True
    return float(inside[torch.tensor(tokens)].float().mean())


def per_category(result: DecodeResult, categories: list[str]) -> dict[str, dict[str, float]]:
    """τ and its counts per category, as the report's table and a model card show them."""
    return {cat: {"tau": m["decode/tau"], "new_tokens": m["decode/new_tokens"],
                  "target_forwards": m["decode/target_forwards"]}
            for cat, m in by_category(result, categories).items()}


class Bench:
    """Holds the target (ours and, lazily, HF's: ``hf_loader``), the draft, and runs methods
    by name."""

    def __init__(self, target: Any, draft: Any = None, hf_loader: Any = None):
        self.target = target
        self.draft = draft
        # Lightning's accelerator for our methods: the one the target was loaded on
        self.accelerator = {"cuda": "gpu"}.get(target.device.type, target.device.type)
        self._hf_loader = hf_loader
        self._hf_model = None

    def hf(self) -> Any:
        """The transformers model of the target (peers, and logit gaps of mismatches)."""
        if self._hf_model is None:
            self._hf_model = self._hf_loader()
        return self._hf_model

    def run_method(self, method: str, prompts: list[list[int]], cfg: DecodeConfig
                   ) -> DecodeResult:
        if method in PEERS:
            return hf_generate(self.hf(), self.target.tokenizer, prompts, cfg,
                               self.target.eos_token_ids, assisted_pld=method != "hf")
        # a Lightning test loop with all prompts in one step, so that continuous batching
        # spans them all; the result's timing is the decoder's own clock
        return evaluate(self.target, prompts, replace(cfg, method=method), self.draft,
                        prompts_per_step=len(prompts), accelerator=self.accelerator)

    def timed(self, method: str, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeResult:
        warm = replace(cfg, max_new_tokens=min(8, cfg.max_new_tokens))
        self.run_method(method, prompts[:1], warm)  # warm-up, excluded from timing
        start = time.perf_counter()
        result = self.run_method(method, prompts, cfg)
        result.seconds.setdefault("total", time.perf_counter() - start)
        return result


def encode_prompts(tokenizer: Any, prompts: list[Any], context: int, max_new_tokens: int
                   ) -> list[list[int]]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for p, row in zip(prompts, ids):
        if len(row) + max_new_tokens > context:
            raise DataError(f"prompt {p.id!r} has {len(row)} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it exceeds the target's context window of "
                            f"{context} tokens. Shorten it or lower --max-new-tokens.")
    return ids


def measure(bench: Bench, cfg: DecodeConfig, methods: list[str], ids: list[list[int]],
            categories: list[str], plain: DecodeResult | None = None,
            log: Callable[[str], None] = lambda line: None,
            repeats: int = 1) -> list[MethodReport]:
    """Time each method on ``ids``; speed-up against ``plain`` and exactness against greedy.

    plain: a timed ``plain`` result on the same ids and config, when the caller has one;
    log: sees one line per method as it finishes (progress of a long bench);
    repeats: rounds of timings, each method once per round in the order given, so a drift in
    the machine's speed falls on every method alike. One report per method and round; its
    speed-up is against ``plain`` of the same round (a paired ratio)."""
    rounds: list[dict[str, DecodeResult]] = []
    for r in range(1, repeats + 1):
        results = {}
        for i, m in enumerate(methods, start=1):
            results[m] = res = bench.timed(m, ids, cfg)
            step = f"[{r}/{repeats}] " if repeats > 1 else ""
            log(f"{step}[{i}/{len(methods)}] {m}: {res.tokens_per_s:.1f} tok/s, "
                f"tau {res.tau:.2f} ({res.seconds['total']:.0f} s)")
        rounds.append(results)
    greedy = cfg.temperature == 0
    reference = rounds[0].get("plain", plain)
    if greedy and reference is None:
        reference = bench.run_method("plain", ids, cfg)
    coverage = vocab_coverage(bench.draft, reference) if reference is not None else None
    reports = []
    for r, results in enumerate(rounds, start=1):
        base = results.get("plain", plain)
        base_tps = base.tokens_per_s if base is not None else None
        for m, res in results.items():
            tps = res.tokens_per_s
            mism = compare(res, reference, ids, bench.hf) if greedy else []
            exact = (not mism) if greedy else None
            speedup = tps / base_tps if base_tps else None
            metrics = decode_metrics(res, categories, speedup, exact)
            if coverage is not None and m in DRAFTED:
                metrics["decode/draft_vocab_coverage"] = coverage
            reports.append(MethodReport(
                method=m, tokens_per_s=tps, new_tokens=res.new_tokens,
                target_forwards=res.target_forwards, tau=res.tau,
                seconds=res.seconds["total"], exact_match=exact, mismatches=mism,
                speedup=speedup, per_category=per_category(res, categories),
                seconds_split=dict(res.seconds),
                metrics=metrics,
                tokens_sha256=hashlib.sha256(json.dumps(res.tokens).encode()).hexdigest(),
                plan=dict(res.plan), repeat=r))
    return reports


def mean_ci(values: list[float], ci: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of repeated measurements (NaN bounds for one value)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + ci / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def check_methods(methods: list[str]) -> None:
    known = sorted([*METHODS, *PEERS])
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for m in methods:
        if m not in known:
            raise ConfigError(f"--methods: unknown method {m!r}; available: {', '.join(known)}")


AUTO = "auto"  # a batch-sweep cell run by the planner


def batch_sweep(bench: Bench, cfg: DecodeConfig, ids: list[list[int]], categories: list[str],
                batch_sizes: list[int], top_ks: list[int | str],
                log: Callable[[dict[str, Any]], None] = lambda row: None
                ) -> list[dict[str, Any]]:
    """One row per (batch size, width); ``log`` sees each row as it is measured. An int width
    is ``tree`` with that ``tree_top_k`` and the fixed shape of ``cfg``; ``AUTO`` is ``hybrid``
    sized by the planner (``--tree auto``), which may choose lookup alone or plain decoding."""
    rows = []
    for b in batch_sizes:
        base = replace(cfg, decode_batch_size=b)
        plain = bench.timed("plain", ids, base)  # the baseline and the reference of every width
        for k in top_ks:
            method = "hybrid" if k == AUTO else "tree"
            tree_cfg = (replace(base, tree="auto") if k == AUTO
                        else replace(base, tree="fixed", tree_top_k=k))
            tree = measure(bench, tree_cfg, [method], ids, categories, plain=plain)[0]
            rows.append({"decode_batch_size": b, "tree_top_k": k, "method": method,
                         "plan": tree.plan,
                         "tree_total_tokens": cfg.tree_total_tokens,
                         "plain_tokens_per_s": plain.tokens_per_s,
                         "tree_tokens_per_s": tree.tokens_per_s, "tau": tree.tau,
                         "speedup": tree.speedup, "exact_match": tree.exact_match,
                         "seconds_split": tree.seconds_split,
                         "metrics": {**tree.metrics,
                                     "decode/plain_tokens_per_s": plain.tokens_per_s}})
            log(rows[-1])
    return rows
