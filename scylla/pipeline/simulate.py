"""Stand-in stages for ``scylla sweep --simulate``: check a sweep file, the stage wiring,
run reuse, the fits and the notebooks in seconds, before spending hours on real runs.

Each simulated stage logs what the real one logs (same stage tags, params, metric names,
one decode run per method like ``scylla bench``) and passes files the way the real ones
do (hidden states -> ``manifest.json``, train -> ``draft.json``, read back downstream), so
a broken wiring fails here too. The numbers come from a hand-written stand-in of the
paper's laws with seeded noise; they are *not* measurements, and every run is tagged
``scylla.simulated=1`` and lives in a ``*-simulated`` experiment.
``SCYLLA_SIMULATE_SECONDS`` makes each stage take that long inside its run (tests kill a
sweep mid-run with it). A stand-in gets its flags parsed by the real stage's parser
(``scylla.pipeline.stages.invoke_stage``), so every default comes from the config dataclasses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from scylla import paths
from scylla.drafts.io import DEFAULT
from scylla.errors import DataError
from scylla.pipeline import tracking

# SmolLM2-135M's widths: the simulated drafts are sized like the real ones
HIDDEN, INTERMEDIATE = 576, 1536
# Spec-Bench's categories (MT-bench's eight, then the other five tasks) and how easy each
# is to draft relative to the mean; summaries and QA copy from the prompt, translation cannot
CATEGORIES = {"writing": 1.0, "roleplay": 0.95, "reasoning": 1.0, "math": 1.1, "coding": 1.05,
              "extraction": 1.1, "stem": 1.0, "humanities": 0.95, "translation": 0.75,
              "summarization": 1.2, "qa": 1.1, "math_reasoning": 1.15, "rag": 1.05}


def _rng(*key: Any) -> np.random.Generator:
    seed = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed)


def _pause() -> None:
    time.sleep(float(os.environ.get("SCYLLA_SIMULATE_SECONDS", "0")))


def draft_params(n_layer: int) -> int:
    """fc (2H->H) plus decoder layers (attention 4H², SwiGLU 3HI); head and embedding are
    the target's, frozen and shared."""
    return 2 * HIDDEN * HIDDEN + n_layer * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)


def tau_chain(train_tokens: float, n_layer: int, kind: str, pretrain_tokens: float,
              seed: int) -> float:
    """Stand-in for Theorems 1.1/1.2: log-linear in tokens and in layers, plus noise."""
    tau = (1.55 + 0.12 * math.log(train_tokens / 1e4) + 0.18 * math.log(n_layer)
           + (0.25 if pretrain_tokens > 0 else 0.0) + (0.35 if kind == "eagle3" else 0.0))
    return max(1.0, tau + _rng("train", train_tokens, n_layer, kind, seed).normal(0, 0.02))


def chain_alphas(tau: float, steps: int = 5, decay: float = 0.9) -> list[float]:
    """Per-step chain acceptance consistent with ``tau`` (val/tau_chain = 1 + the sum over
    steps of their product): step i accepts a·decay^(i-1), with a found by bisection."""
    def length(a: float) -> float:
        return 1 + float(np.sum(np.cumprod([min(1.0, a * decay ** i) for i in range(steps)])))

    lo, hi = 0.0, 1.0 / decay ** (steps - 1)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if length(mid) < tau else (lo, mid)
    return [min(1.0, lo * decay ** i) for i in range(steps)]


def hidden_states(args: dict[str, Any]) -> None:
    """Like ``scylla hidden-states``: its own shard directory, named in the tag ``shards``."""
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()
    out = paths.data_dir() / "simulated" / "hidden_states" / key[:16]
    with tracking.stage_run("hidden_states", args):
        import mlflow

        _pause()
        tokens = args["build_tokens"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"tokens": tokens, "simulated": True}))
        mlflow.set_tag("shards", str(out))
        mlflow.log_metrics({"hidden_states/train_tokens_built": tokens,
                            "hidden_states/train_tokens_per_s": 5e3})


def train(args: dict[str, Any]) -> None:
    shards = Path(args.get("shards") or "")
    if not (shards / "manifest.json").is_file():
        raise DataError(f"simulated train: no manifest.json in shards dir {shards}")
    tokens, n_layer, kind = args["train_tokens"], args["draft_n_layer"], args["kind"]
    tau = tau_chain(tokens, n_layer, kind, args["pretrain_tokens"], args["seed"])
    params = {**args, "draft_params": draft_params(n_layer)}
    with tracking.stage_run("train", params):
        import mlflow

        _pause()
        draft = Path(args["out"]) / "draft"
        draft.mkdir(parents=True, exist_ok=True)
        (draft / "draft.json").write_text(json.dumps({"tau_chain": tau, "kind": kind}))
        mlflow.set_tag("draft", str(draft))
        alphas = chain_alphas(tau)
        mlflow.log_metrics({"val/tau_chain": tau, "val/top1_acc": alphas[0],
                            **{f"val/alpha_at_{i}": a for i, a in enumerate(alphas, 1)},
                            "train/loss": 2.0 / tau, "val/loss": 2.0 / tau,
                            "train/tokens_seen": tokens})


def _method_numbers(method: str, tau_draft: float, batch: int, top_k: int, total: int,
                    rng: np.random.Generator) -> tuple[float, float]:
    """(τ, tokens/s) stand-in for Theorem 1.3: a wider tree accepts more per step but its
    verification costs more as the batch makes the target compute-bound."""
    plain_tps = 18.0 * batch ** 0.7  # batching amortises weight reads, sub-linearly
    if method in ("plain", "hf"):
        tau, cost = 1.0, 1.0
    elif method == "pld":
        tau, cost = 1.3, 1.02
    else:
        width = total if method in ("tree", "hybrid") else top_k
        tau = 1 + (tau_draft - 1) * max(0.5, 1 + 0.35 * math.log(width / 4))
        cost = 1.02 + width * batch / 60
    return tau, plain_tps * tau / cost * (1 + rng.normal(0, 0.01))


def decode(args: dict[str, Any]) -> None:
    draft = Path(args.get("draft") or "")
    methods = [m for m in args["methods"].split(",") if m]
    needs_draft = any(m in ("chain", "tree", "static-tree", "hybrid") for m in methods)
    if needs_draft and str(draft) == DEFAULT:
        raise DataError(f"simulated decode: --draft {DEFAULT} names the real shipped draft, which "
                        "a stand-in cannot decode; simulate a profile whose train stage makes "
                        "the draft, or run this one without --simulate")
    if needs_draft and not (draft / "draft.json").is_file():
        raise DataError(f"simulated decode: no draft.json in draft dir {draft}")
    tau_draft = json.loads((draft / "draft.json").read_text())["tau_chain"] if needs_draft \
        else 1.0
    batch, top_k, total = args["decode_batch_size"], args["tree_top_k"], args["tree_total_tokens"]
    n_prompts, max_new = args["num_prompts"], args["max_new_tokens"]
    numbers = {m: _method_numbers(m, tau_draft, batch, top_k, total,
                                  _rng("decode", m, tau_draft, batch, top_k, total, args["seed"]))
               for m in methods}
    base = numbers.get("plain", (None, None))[1]
    for m, (tau, tps) in numbers.items():
        with tracking.stage_run("decode", {**args, "method": m}, run_name=f"bench-{m}"):
            import mlflow

            _pause()
            new_tokens = n_prompts * max_new
            metrics = {"decode/tau": tau, "decode/tokens_per_s": tps,
                       "decode/new_tokens": new_tokens,
                       "decode/target_forwards": round(new_tokens / tau)}
            if base:
                metrics["decode/speedup"] = tps / base
            for cat, ease in CATEGORIES.items():
                metrics[f"decode/tau/{cat}"] = 1 + (tau - 1) * ease
            mlflow.log_metrics(metrics)
            mlflow.set_tag("machine", "simulated")


STAGES = {"hidden_states": hidden_states, "train": train, "decode": decode}


def run_stage(stage: str, args: dict[str, Any]) -> None:
    """Run the stand-in of ``stage`` on the flags its real parser gave (``vars(namespace)``)."""
    STAGES[stage](args)
