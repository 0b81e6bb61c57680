"""``scylla bench``: decoding methods side by side, same prompts, same process, same machine.

Each method gets one untimed warm-up call, then decodes every prompt. Reported per method:
tokens/s, new tokens, target forwards, τ (new tokens / target forwards), speed-up over
``plain`` measured in the same run, and whether its tokens equal plain greedy decoding exactly
(at T=0). A mismatch is shown with the target's top-1/top-2 logit gap where the outputs first
differ: a gap near zero is a numerical near-tie, anything else is a bug. Our methods run as a
Lightning test loop (``scylla.decoding.evaluation``) on the target's device; the transformers
peers call ``generate``.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from scylla import machine
from scylla.config import DecodeConfig, TargetSpec, as_params
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


def per_category(result: DecodeResult, categories: list[str]) -> dict[str, dict[str, float]]:
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for cat, s in zip(categories, result.stats):
        sums[cat]["new_tokens"] += s.new_tokens
        sums[cat]["target_forwards"] += s.target_forwards
    return {c: {"tau": v["new_tokens"] / max(1, v["target_forwards"]), **v}
            for c, v in sorted(sums.items())}


class Bench:
    """Holds the target (ours and, lazily, HF's), the draft and runs methods by name."""

    def __init__(self, target: Any, draft: Any = None, hf_loader: Any = None):
        self.target = target
        self.draft = draft
        # Lightning's accelerator for our methods: the one the target was loaded on
        self.accelerator = {"cuda": "gpu"}.get(target.device.type, target.device.type)
        self._hf_loader = hf_loader
        self._hf_model = None

    @classmethod
    def load(cls, spec: TargetSpec, draft_path: str | None) -> "Bench":
        from scylla.targets import load_hf_model, load_target

        target = load_target(spec)
        draft = None
        if draft_path:
            from scylla.drafts import load_draft

            draft = load_draft(draft_path, target)
        dtype = str(target.dtype).removeprefix("torch.")
        return cls(target, draft, lambda: load_hf_model(spec.target, dtype, spec.device))

    def hf(self) -> Any:
        """The transformers model of the target (peers, and logit gaps of mismatches)."""
        if self._hf_model is None:
            self._hf_model = self._hf_loader()
        return self._hf_model

    def run_method(self, method: str, prompts: list[list[int]], cfg: DecodeConfig
                   ) -> DecodeResult:
        if method in PEERS:
            from scylla.decoding.hf_peers import hf_generate

            return hf_generate(self.hf(), self.target.tokenizer, prompts, cfg,
                               self.target.eos_token_ids, assisted_pld=method != "hf")
        from scylla.decoding.evaluation import evaluate

        # a Lightning test loop with all prompts in one step, so that continuous batching
        # spans them all; the result's timing is the decoder's own clock
        result, _ = evaluate(self.target, prompts, replace(cfg, method=method), self.draft,
                             prompts_per_step=len(prompts), accelerator=self.accelerator)
        return result

    def timed(self, method: str, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeResult:
        warm = replace(cfg, max_new_tokens=min(8, cfg.max_new_tokens))
        self.run_method(method, prompts[:1], warm)  # warm-up, excluded from timing
        start = time.perf_counter()
        result = self.run_method(method, prompts, cfg)
        result.seconds.setdefault("total", time.perf_counter() - start)
        return result


def encode_prompts(tokenizer: Any, prompts: list[Any], context: int, max_new_tokens: int
                   ) -> list[list[int]]:
    from scylla.data.prompts import prompt_ids

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for p, row in zip(prompts, ids):
        if len(row) + max_new_tokens > context:
            raise DataError(f"prompt {p.id!r} has {len(row)} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it exceeds the target's context window of "
                            f"{context} tokens. Shorten it or lower --max-new-tokens.")
    return ids


def measure(bench: Bench, cfg: DecodeConfig, methods: list[str], ids: list[list[int]],
            categories: list[str], plain: DecodeResult | None = None,
            log: Callable[[str], None] = lambda line: None) -> list[MethodReport]:
    """Time each method on ``ids``; speed-up against ``plain`` and exactness against greedy.

    plain: a timed ``plain`` result on the same ids and config, when the caller has one;
    log: sees one line per method as it finishes (progress of a long bench)."""
    results = {}
    for i, m in enumerate(methods, start=1):
        results[m] = r = bench.timed(m, ids, cfg)
        log(f"[{i}/{len(methods)}] {m}: {r.tokens_per_s:.1f} tok/s, "
            f"tau {r.tau:.2f} ({r.seconds['total']:.0f} s)")
    greedy = cfg.temperature == 0
    plain = results.get("plain", plain)
    reference = plain
    if greedy and reference is None:
        reference = bench.run_method("plain", ids, cfg)
    base_tps = plain.tokens_per_s if plain is not None else None
    reports = []
    for m, r in results.items():
        tps = r.tokens_per_s
        mism = compare(r, reference, ids, bench.hf) if greedy else []
        reports.append(MethodReport(
            method=m, tokens_per_s=tps, new_tokens=r.new_tokens,
            target_forwards=r.target_forwards, tau=r.tau, seconds=r.seconds["total"],
            exact_match=(not mism) if greedy else None, mismatches=mism,
            speedup=tps / base_tps if base_tps else None,
            per_category=per_category(r, categories), seconds_split=dict(r.seconds)))
    return reports


def describe(bench: Bench, spec: TargetSpec, cfg: DecodeConfig, prompts: list[Any],
             draft_path: str | None) -> dict[str, Any]:
    return {"machine": machine.description(), "target": spec.target,
            "device": str(bench.target.device),
            "dtype": str(bench.target.dtype).removeprefix("torch."),
            "draft": draft_path, "num_prompts": len(prompts),
            "prompt_ids": [p.id for p in prompts], "config": as_params(cfg)}


def check_methods(methods: list[str]) -> None:
    from scylla.decoding import METHODS

    known = sorted([*METHODS, *PEERS])
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for m in methods:
        if m not in known:
            raise ConfigError(f"--methods: unknown method {m!r}; available: {', '.join(known)}")


def run_bench(spec: TargetSpec, cfg: DecodeConfig, methods: list[str], prompts: list[Any],
              draft_path: str | None = None, bench: Bench | None = None,
              log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure ``methods`` on ``prompts``; ``bench`` reuses loaded models across calls."""
    check_methods(methods)
    bench = bench or Bench.load(spec, draft_path)
    ids = encode_prompts(bench.target.tokenizer, prompts,
                         bench.target.model.config.max_position_embeddings, cfg.max_new_tokens)
    reports = measure(bench, cfg, methods, ids, [p.category for p in prompts], log=log)
    return {**describe(bench, spec, cfg, prompts, draft_path),
            "methods": [asdict(r) for r in reports]}


def run_batch_sweep(spec: TargetSpec, cfg: DecodeConfig, prompts: list[Any],
                    batch_sizes: list[int], top_ks: list[int], draft_path: str | None
                    ) -> dict[str, Any]:
    """Throughput of ``plain`` and of ``tree`` per tree width, for each decode batch size."""
    bench = Bench.load(spec, draft_path)
    ids = encode_prompts(bench.target.tokenizer, prompts,
                         bench.target.model.config.max_position_embeddings, cfg.max_new_tokens)
    rows = batch_sweep(bench, cfg, ids, [p.category for p in prompts], batch_sizes, top_ks,
                       log=lambda r: print(f"batch {r['decode_batch_size']:>3} tree_top_k "
                                           f"{r['tree_top_k']}: {r['tree_tokens_per_s']:.1f} "
                                           f"tok/s (plain {r['plain_tokens_per_s']:.1f}), "
                                           f"tau {r['tau']:.2f}", flush=True))
    return {**describe(bench, spec, cfg, prompts, draft_path), "sweep": rows}


def batch_sweep(bench: Bench, cfg: DecodeConfig, ids: list[list[int]], categories: list[str],
                batch_sizes: list[int], top_ks: list[int],
                log: Callable[[dict[str, Any]], None] = lambda row: None
                ) -> list[dict[str, Any]]:
    """One row per (batch size, width); ``log`` sees each row as it is measured."""
    rows = []
    for b in batch_sizes:
        base = replace(cfg, decode_batch_size=b)
        plain = bench.timed("plain", ids, base)  # the baseline and the reference of every width
        for k in top_ks:
            tree_cfg = replace(base, tree_top_k=k)
            tree = measure(bench, tree_cfg, ["tree"], ids, categories, plain=plain)[0]
            rows.append({"decode_batch_size": b, "tree_top_k": k,
                         "tree_total_tokens": cfg.tree_total_tokens,
                         "plain_tokens_per_s": plain.tokens_per_s,
                         "tree_tokens_per_s": tree.tokens_per_s, "tau": tree.tau,
                         "speedup": tree.speedup, "exact_match": tree.exact_match,
                         "seconds_split": tree.seconds_split})
            log(rows[-1])
    return rows


def format_sweep(report: dict[str, Any]) -> str:
    ks = sorted({r["tree_top_k"] for r in report["sweep"]})
    lines = [f"machine: {report['machine']}", f"target: {report['target']}, draft: "
             f"{report['draft']}, prompts: {report['num_prompts']}, tree_total_tokens: "
             f"{report['config']['tree_total_tokens']}, tree_depth: "
             f"{report['config']['tree_depth']}",
             "tokens/s (speed-up over plain, tau) per decode batch size and tree_top_k",
             f"{'batch':>6}{'plain':>9}" + "".join(f"{'k=' + str(k):>20}" for k in ks)
             + f"{'best k':>8}"]
    for b in sorted({r["decode_batch_size"] for r in report["sweep"]}):
        cells = {r["tree_top_k"]: r for r in report["sweep"] if r["decode_batch_size"] == b}
        best = max(cells.values(), key=lambda r: r["tree_tokens_per_s"])
        lines.append(f"{b:>6}{cells[ks[0]]['plain_tokens_per_s']:>9.1f}" + "".join(
            f"{c['tree_tokens_per_s']:>8.1f} ({c['speedup']:.2f}x,{c['tau']:.2f})"
            .rjust(20) for c in (cells[k] for k in ks)) + f"{best['tree_top_k']:>8}")
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [f"machine: {report['machine']}",
             f"target: {report['target']} ({report['dtype']}, {report['device']}), prompts: "
             f"{report['num_prompts']}, decode_batch_size: {cfg['decode_batch_size']}, "
             f"max_new_tokens: {cfg['max_new_tokens']}, temperature: {cfg['temperature']}",
             f"{'method':<16}{'tok/s':>8}{'speedup':>9}{'tau':>7}{'new tok':>9}"
             f"{'fwds':>7}{'exact':>7}"]
    for m in report["methods"]:
        exact = {None: "-", True: "yes", False: "NO"}[m["exact_match"]]
        sp = f"{m['speedup']:.2f}x" if m["speedup"] else "-"
        lines.append(f"{m['method']:<16}{m['tokens_per_s']:>8.1f}{sp:>9}{m['tau']:>7.2f}"
                     f"{m['new_tokens']:>9}{m['target_forwards']:>7}{exact:>7}")
        for mm in m["mismatches"]:
            gap = f", logit gap {mm['logit_gap']:.4f}" if "logit_gap" in mm else ""
            lines.append(f"    prompt {mm['prompt']}: first difference at token {mm['position']}"
                         f"{gap}")
    cats = sorted({c for m in report["methods"] for c in m["per_category"]})
    if len(cats) > 1:
        lines.append("tau per category")
        lines.append(f"{'method':<16}" + "".join(f"{c[:10]:>11}" for c in cats))
        for m in report["methods"]:
            lines.append(f"{m['method']:<16}" + "".join(
                f"{m['per_category'].get(c, {}).get('tau', float('nan')):>11.2f}" for c in cats))
    return "\n".join(lines)


def log_to_mlflow(report: dict[str, Any], spec: TargetSpec) -> None:
    from scylla.tracking import stage_run

    for m in report["methods"]:
        params = {**as_params(spec), **report["config"], "method": m["method"],
                  "num_prompts": report["num_prompts"], "draft": report["draft"] or ""}
        with stage_run("decode", params, run_name=f"bench-{m['method']}") as run:
            import mlflow

            metrics = {"decode/tau": m["tau"], "decode/tokens_per_s": m["tokens_per_s"],
                       "decode/new_tokens": m["new_tokens"],
                       "decode/target_forwards": m["target_forwards"],
                       "decode/seconds": m["seconds"]}
            if m["speedup"]:
                metrics["decode/speedup"] = m["speedup"]
            if m["exact_match"] is not None:
                metrics["decode/exact_match"] = float(m["exact_match"])
            for cat, v in m["per_category"].items():
                metrics[f"decode/tau/{cat}"] = v["tau"]
            mlflow.log_metrics(metrics)
            mlflow.set_tag("machine", report["machine"])
            mlflow.log_dict(report, "bench.json")
            m["mlflow_run_id"] = run.info.run_id


def log_sweep_to_mlflow(report: dict[str, Any], spec: TargetSpec) -> None:
    import mlflow

    from scylla.tracking import stage_run

    for row in report["sweep"]:
        params = {**as_params(spec), **report["config"], "method": "tree",
                  "decode_batch_size": row["decode_batch_size"], "tree_top_k": row["tree_top_k"],
                  "num_prompts": report["num_prompts"], "draft": report["draft"] or ""}
        with stage_run("decode", params, run_name=f"sweep-b{row['decode_batch_size']}"
                                                  f"-k{row['tree_top_k']}"):
            mlflow.log_metrics({"decode/tau": row["tau"],
                                "decode/tokens_per_s": row["tree_tokens_per_s"],
                                "decode/plain_tokens_per_s": row["plain_tokens_per_s"],
                                "decode/speedup": row["speedup"]})
            mlflow.set_tag("machine", report["machine"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scylla.cli import add_dataclass_args

    parser.add_argument("--methods", default="hf,plain",
                        help="Comma-separated methods: hf, hf-assisted-pld, plain, and the "
                             "speculative ones (chain, tree, static-tree, pld).")
    parser.add_argument("--prompts", default=None,
                        help="Prompt JSONL (Spec-Bench's question.jsonl or any {'prompt': ...} "
                             "lines). Default: held-out ShareGPT conversations.")
    parser.add_argument("--num-prompts", type=int, default=20,
                        help="Prompts to decode, spread evenly over the file's categories.")
    parser.add_argument("--draft", default=None, help="Draft checkpoint directory.")
    parser.add_argument("--json", default=None, help="Write the full report to this file.")
    parser.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core). On a "
                             "machine shared with other jobs, 1 thread measures far steadier.")
    parser.add_argument("--sweep-batch", default=None,
                        help="Comma-separated decode batch sizes, e.g. 1,2,4,8,16: report plain "
                             "and tree throughput per batch size for each --sweep-top-k.")
    parser.add_argument("--sweep-top-k", default="1,2,4,8",
                        help="tree_top_k values (tree widths) for --sweep-batch.")
    parser.add_argument("--forward-cost", default=None,
                        help="Comma-separated token counts, e.g. 1,2,4,8,16: time one target "
                             "forward (and one draft forward, with --draft) of k new tokens on "
                             "a --context-token cache instead of decoding; sizes trees.")
    parser.add_argument("--context", type=int, default=256,
                        help="Cached tokens for --forward-cost.")
    add_dataclass_args(parser, TargetSpec)
    add_dataclass_args(parser, DecodeConfig, skip=("method",))


def int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}={text!r}: expected integers >= 1")
    return values


def load_bench_prompts(path: str | None, num_prompts: int) -> list[Any]:
    from scylla.data.prompts import load_prompts, sharegpt_prompts

    if num_prompts < 1:
        raise ConfigError(f"--num-prompts={num_prompts}: must be >= 1")
    if path is None:
        return sharegpt_prompts(num_prompts)
    return load_prompts(Path(path), num_prompts=num_prompts)


def run_forward_cost(spec: TargetSpec, args: argparse.Namespace) -> int:
    from scylla.decoding.forward_cost import forward_cost, format_forward_cost

    if args.context < 1:
        raise ConfigError(f"--context={args.context}: must be >= 1")
    bench = Bench.load(spec, args.draft)
    ks = int_list("--forward-cost", args.forward_cost)
    limit = bench.target.model.config.max_position_embeddings
    if args.context + max(ks) > limit:
        raise ConfigError(f"--context={args.context} plus k={max(ks)} exceeds the target's "
                          f"context window of {limit} tokens")
    rows = forward_cost(bench.target.model, ks, args.context, bench.draft)
    report = {"machine": machine.description(), "target": spec.target, "draft": args.draft,
              "context": args.context, "threads": torch.get_num_threads(), "forward_cost": rows}
    print(format_forward_cost(rows, args.context))
    if not args.no_mlflow:
        import mlflow

        from scylla.tracking import stage_run

        params = {**as_params(spec), "context": args.context, "draft": args.draft or ""}
        with stage_run("forward_cost", params, run_name="forward-cost"):
            for r in rows:
                mlflow.log_metric("forward_cost/target_ms", r["target_ms"], step=r["k"])
                if "draft_ms" in r:
                    mlflow.log_metric("forward_cost/draft_ms", r["draft_ms"], step=r["k"])
            mlflow.set_tag("machine", report["machine"])
            mlflow.log_dict(report, "forward_cost.json")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    from scylla.cli import dataclass_from_args

    spec = dataclass_from_args(TargetSpec, args)
    cfg = dataclass_from_args(DecodeConfig, args)
    if args.threads < 0:
        raise ConfigError(f"--threads={args.threads}: must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    if args.forward_cost:
        return run_forward_cost(spec, args)
    prompts = load_bench_prompts(args.prompts, args.num_prompts)
    if args.sweep_batch:
        report = run_batch_sweep(spec, cfg, prompts, int_list("--sweep-batch", args.sweep_batch),
                                 int_list("--sweep-top-k", args.sweep_top_k), args.draft)
        if not args.no_mlflow:
            log_sweep_to_mlflow(report, spec)
        print(format_sweep(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
    report = run_bench(spec, cfg, methods, prompts, args.draft,
                       log=lambda line: print(line, flush=True))
    if not args.no_mlflow:
        log_to_mlflow(report, spec)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"report written to {args.json}")
    return 0
