"""``scylla bench`` (stage ``decode``): decoding methods side by side on the same prompts
(``scylla.decoding.bench``), a batch-size sweep, or the forward cost of k new tokens; each
logged as ``decode`` stage runs in MLflow and printed as a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import mlflow
import torch

from scylla.commands.cli import add_dataclass_args, dataclass_from_args, say
from scylla.config import DecodeConfig, TargetSpec, as_params
from scylla.data.prompts import load_prompts, sharegpt_prompts
from scylla.decoding.bench import (
    AUTO,
    Bench,
    batch_sweep,
    check_methods,
    encode_prompts,
    mean_ci,
    measure,
)
from scylla.decoding.forward_cost import format_forward_cost, forward_cost
from scylla.decoding.methods import DRAFTED
from scylla.drafts.io import DEFAULT, from_pretrained
from scylla.errors import ConfigError
from scylla.modeling.targets import load_hf_model, load_target
from scylla.pipeline import machine
from scylla.pipeline.tracking import stage_run


def load_bench(spec: TargetSpec, draft_path: str | None) -> Bench:
    """The target, the draft at ``draft_path`` (if any), and HF's target loaded on demand."""
    target = load_target(spec)
    draft = from_pretrained(draft_path, target) if draft_path else None
    dtype = str(target.dtype).removeprefix("torch.")
    return Bench(target, draft, lambda: load_hf_model(spec.target, dtype, spec.device))


def describe(bench: Bench, spec: TargetSpec, cfg: DecodeConfig, prompts: list[Any],
             draft_path: str | None) -> dict[str, Any]:
    return {"machine": machine.description(), "target": spec.target,
            "device": str(bench.target.device),
            "dtype": str(bench.target.dtype).removeprefix("torch."),
            "draft": draft_path, "num_prompts": len(prompts),
            "prompt_ids": [p.id for p in prompts], "prompts_sha256": prompts_digest(prompts),
            "config": as_params(cfg)}


def prompts_digest(prompts: list[Any]) -> str:
    """Names the exact prompts decoded (ids, categories, first turns), logged with each run."""
    text = json.dumps([[p.id, p.category, p.turns[0]] for p in prompts])
    return hashlib.sha256(text.encode()).hexdigest()


def run_bench(spec: TargetSpec, cfg: DecodeConfig, methods: list[str], prompts: list[Any],
              draft_path: str | None = None, bench: Bench | None = None,
              log: Callable[[str], None] = lambda line: None, repeats: int = 1
              ) -> dict[str, Any]:
    """Measure ``methods`` on ``prompts`` (``repeats`` interleaved rounds); ``bench`` reuses
    loaded models across calls."""
    check_methods(methods)
    bench = bench or load_bench(spec, draft_path)
    ids = encode_prompts(bench.target.tokenizer, prompts,
                         bench.target.model.config.max_position_embeddings, cfg.max_new_tokens)
    reports = measure(bench, cfg, methods, ids, [p.category for p in prompts], log=log,
                      repeats=repeats)
    return {**describe(bench, spec, cfg, prompts, draft_path), "repeats": repeats,
            "methods": [asdict(r) for r in reports]}


def run_batch_sweep(spec: TargetSpec, cfg: DecodeConfig, prompts: list[Any],
                    batch_sizes: list[int], top_ks: list[int], draft_path: str | None
                    ) -> dict[str, Any]:
    """Throughput of ``plain`` and of ``tree`` per tree width, for each decode batch size."""
    bench = load_bench(spec, draft_path)
    ids = encode_prompts(bench.target.tokenizer, prompts,
                         bench.target.model.config.max_position_embeddings, cfg.max_new_tokens)
    rows = batch_sweep(bench, cfg, ids, [p.category for p in prompts], batch_sizes, top_ks,
                       log=lambda r: say(f"batch {r['decode_batch_size']:>3} tree_top_k "
                                           f"{r['tree_top_k']}: {r['tree_tokens_per_s']:.1f} "
                                           f"tok/s (plain {r['plain_tokens_per_s']:.1f}), "
                                           f"tau {r['tau']:.2f}", flush=True))
    return {**describe(bench, spec, cfg, prompts, draft_path), "sweep": rows}


def format_sweep(report: dict[str, Any]) -> str:
    ks = list(dict.fromkeys(r["tree_top_k"] for r in report["sweep"]))
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
    plans = [r for r in report["sweep"] if r["plan"]]
    if plans:
        lines.append(f"k={AUTO}: hybrid sized by the planner per batch size")
        lines += [f"{r['decode_batch_size']:>6}  {describe_plan(r['plan'])}" for r in plans]
    return "\n".join(lines)


def describe_plan(plan: dict[str, Any]) -> str:
    what = {"plain": "plain decoding (no tree pays)",
            "lookup": f"prompt lookup alone, {plan['lookup_len']} tokens",
            "tree": f"draft tree of {plan['tree_total_tokens']} tokens, depth "
                    f"{plan['tree_depth']}",
            "hybrid": f"draft tree of {plan['tree_total_tokens']} tokens, depth "
                      f"{plan['tree_depth']}, + {plan['lookup_len']} lookup tokens"}[plan["mode"]]
    if plan["lookup_len"]:
        what += f" after a {plan['lookup_min_match']}-token match"
    return (f"{what}; predicted tau {plan['tau']:.2f}, speed-up {plan['speedup']:.2f}x "
            f"(the last of {plan['plans']} plans, on the latest {plan['calibration_steps']} "
            f"calibration row-steps, {plan['calibrated']} of them from this decode)")


def prompt_cis(metrics: dict[str, float]) -> str:
    """τ and the acceptances with their bootstrap CIs over prompts ('' when they have none)."""
    names = {"decode/tau": "tau", "decode/alpha_at_0": "first-token acceptance",
             "decode/alpha": "acceptance"}
    parts = [f"{label} {metrics[k]:.2f} [{metrics[k + '_ci_low']:.2f}, "
             f"{metrics[k + '_ci_high']:.2f}]" for k, label in names.items()
             if k + "_ci_low" in metrics and metrics[k + "_ci_high"] > metrics[k + "_ci_low"]]
    return ", ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    repeats = report.get("repeats", 1)
    lines = [f"machine: {report['machine']}",
             f"target: {report['target']} ({report['dtype']}, {report['device']}), prompts: "
             f"{report['num_prompts']}, decode_batch_size: {cfg['decode_batch_size']}, "
             f"max_new_tokens: {cfg['max_new_tokens']}, temperature: {cfg['temperature']}"]
    if repeats > 1:
        lines.append(f"{repeats} interleaved rounds: tok/s and speed-up are means with 95% "
                     "t-intervals over rounds; the speed-up of a round is against plain of "
                     "the same round")
    lines += [f"{'method':<16}{'tok/s':>8}{'speedup':>9}{'tau':>7}{'new tok':>9}"
              f"{'fwds':>7}{'draft ms':>9}{'verify ms':>10}{'exact':>7}",
              f"{'':<56}{'(per target forward)':>19}"]
    for method, rounds in group_rounds(report["methods"]).items():
        m = rounds[0]
        exact = {None: "-", True: "yes", False: "NO"}[
            None if m["exact_match"] is None else all(r["exact_match"] for r in rounds)]
        tps = mean_ci([r["tokens_per_s"] for r in rounds])
        sp = (mean_ci([r["speedup"] for r in rounds]) if m["speedup"] else None)
        split, fwds = m["seconds_split"], max(1, m["target_forwards"])
        per = {part: f"{1e3 * split[part] / fwds:.1f}" if part in split else "-"
               for part in ("draft", "verify")}
        lines.append(f"{method:<16}{tps[0]:>8.1f}{f'{sp[0]:.2f}x' if sp else '-':>9}"
                     f"{m['tau']:>7.2f}{m['new_tokens']:>9}{m['target_forwards']:>7}"
                     f"{per['draft']:>9}{per['verify']:>10}{exact:>7}")
        if len(rounds) > 1:
            lines.append(f"    {len(rounds)} rounds: {tps[0]:.1f} [{tps[1]:.1f}, {tps[2]:.1f}] "
                         "tok/s" + (f", speed-up {sp[0]:.2f} [{sp[1]:.2f}, {sp[2]:.2f}]x"
                                    if sp else ""))
        over = prompt_cis(m["metrics"])
        if over:
            lines.append(f"    over prompts (95% bootstrap CI): {over}")
        if m["plan"]:
            lines.append(f"    planned: {describe_plan(m['plan'])}")
        for r in rounds:
            for mm in r["mismatches"]:
                gap = f", logit gap {mm['logit_gap']:.4f}" if "logit_gap" in mm else ""
                where = f"round {r['repeat']}, " if len(rounds) > 1 else ""
                lines.append(f"    {where}prompt {mm['prompt']}: first difference at token "
                             f"{mm['position']}{gap}")
    firsts = [rounds[0] for rounds in group_rounds(report["methods"]).values()]
    cover = [m["metrics"]["decode/draft_vocab_coverage"] for m in firsts
             if "decode/draft_vocab_coverage" in m["metrics"]]
    if cover:
        lines.append(f"draft vocabulary coverage of plain decoding's tokens: {cover[0]:.1%} "
                     "(a token outside it is never drafted)")
    cats = sorted({c for m in firsts for c in m["per_category"]})
    if len(cats) > 1:
        lines.append("tau per category")
        lines.append(f"{'method':<16}" + "".join(f"{c[:10]:>11}" for c in cats))
        for m in firsts:
            lines.append(f"{m['method']:<16}" + "".join(
                f"{m['per_category'].get(c, {}).get('tau', float('nan')):>11.2f}" for c in cats))
    return "\n".join(lines)


def group_rounds(reports: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A report's method rows by method, in the order measured (one row per round)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        out.setdefault(r["method"], []).append(r)
    return out


def log_to_mlflow(report: dict[str, Any], spec: TargetSpec) -> None:
    """One ``decode`` stage run per method (and round, with ``repeats``: param ``repeat``,
    the unit a fit resamples), with its ``decode_metrics``."""
    repeats = report.get("repeats", 1)
    for m in report["methods"]:
        params = {**as_params(spec), **report["config"], "method": m["method"],
                  "num_prompts": report["num_prompts"], "draft": report["draft"] or "",
                  "prompts": report.get("prompts", ""),
                  "prompts_sha256": report["prompts_sha256"]}
        name = f"bench-{m['method']}"
        if repeats > 1:
            params.update(repeats=repeats, repeat=m["repeat"])
            name += f"-r{m['repeat']}"
        with stage_run("decode", params, run_name=name) as run:
            mlflow.log_metrics(m["metrics"])
            mlflow.set_tag("machine", report["machine"])
            mlflow.log_dict(report, "bench.json")
            m["mlflow_run_id"] = run.info.run_id


def log_sweep_to_mlflow(report: dict[str, Any], spec: TargetSpec) -> None:
    """One ``decode`` stage run per (batch size, width) of a batch sweep."""
    for row in report["sweep"]:
        params = {**as_params(spec), **report["config"], "method": row["method"],
                  "prompts": report.get("prompts", ""), "prompts_sha256": report["prompts_sha256"],
                  "tree": "auto" if row["tree_top_k"] == AUTO else "fixed",
                  "decode_batch_size": row["decode_batch_size"], "tree_top_k": row["tree_top_k"],
                  "num_prompts": report["num_prompts"], "draft": report["draft"] or ""}
        with stage_run("decode", params, run_name=f"sweep-b{row['decode_batch_size']}"
                                                  f"-k{row['tree_top_k']}"):
            mlflow.log_metrics(row["metrics"])
            mlflow.set_tag("machine", report["machine"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="hf,plain",
                        help="Comma-separated methods: hf, hf-assisted-pld, plain, and the "
                             "speculative ones (chain, tree, static-tree, pld, hybrid).")
    parser.add_argument("--prompts", default=None,
                        help="Prompt JSONL (Spec-Bench's question.jsonl or any {'prompt': ...} "
                             "lines). Default: held-out ShareGPT conversations.")
    parser.add_argument("--num-prompts", type=int, default=20,
                        help="Prompts to decode, spread evenly over the file's categories.")
    parser.add_argument("--draft", default=None,
                        help=f"Draft checkpoint directory, or '{DEFAULT}' (the draft shipped for "
                             "the target), which methods that need a draft use when none is "
                             "given.")
    parser.add_argument("--json", default=None, help="Write the full report to this file.")
    parser.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Time the methods this many rounds, interleaved (each method once "
                             "per round), and report means with 95%% intervals; each round is "
                             "logged as its own run with param 'repeat'.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core). On a "
                             "machine shared with other jobs, 1 thread measures far steadier.")
    parser.add_argument("--sweep-batch", default=None,
                        help="Comma-separated decode batch sizes, e.g. 1,2,4,8,16: report plain "
                             "and tree throughput per batch size for each --sweep-top-k.")
    parser.add_argument("--sweep-top-k", default=f"1,2,4,8,{AUTO}",
                        help="tree_top_k values (tree widths, fixed shape) for --sweep-batch; "
                             f"'{AUTO}' adds hybrid sized by the planner (--tree auto).")
    parser.add_argument("--forward-cost", default=None,
                        help="Comma-separated token counts, e.g. 1,2,4,8,16: time one target "
                             "forward (and one draft forward, with --draft) of k new tokens per "
                             "row on a --context-token cache, --decode-batch-size rows, instead "
                             "of decoding; sizes trees.")
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


def widths(text: str) -> list[int | str]:
    """--sweep-top-k: integers >= 1 and 'auto'."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v != AUTO and not (v.isdigit() and int(v) >= 1)]
    if not values or bad:
        raise ConfigError(f"--sweep-top-k={text!r}: expected comma-separated integers >= 1 "
                          f"and '{AUTO}'")
    return [v if v == AUTO else int(v) for v in values]


SHAREGPT_VAL = "sharegpt-val"  # the default prompts: held-out ShareGPT first turns


def load_bench_prompts(path: str | None, num_prompts: int) -> list[Any]:
    if num_prompts < 1:
        raise ConfigError(f"--num-prompts={num_prompts}: must be >= 1")
    if path is None:
        return sharegpt_prompts(num_prompts)
    return load_prompts(Path(path), num_prompts=num_prompts)


def run_forward_cost(spec: TargetSpec, args: argparse.Namespace) -> int:
    if args.context < 1:
        raise ConfigError(f"--context={args.context}: must be >= 1")
    bench = load_bench(spec, args.draft)
    ks = int_list("--forward-cost", args.forward_cost)
    limit = bench.target.model.config.max_position_embeddings
    if args.context + max(ks) > limit:
        raise ConfigError(f"--context={args.context} plus k={max(ks)} exceeds the target's "
                          f"context window of {limit} tokens")
    batch = args.decode_batch_size
    rows = forward_cost(bench.target.model, ks, args.context, bench.draft, batch=batch)
    report = {"machine": machine.description(), "target": spec.target, "draft": args.draft,
              "context": args.context, "decode_batch_size": batch,
              "threads": torch.get_num_threads(), "forward_cost": rows}
    say(format_forward_cost(rows, args.context, batch))
    if not args.no_mlflow:
        params = {**as_params(spec), "context": args.context, "draft": args.draft or "",
                  "decode_batch_size": batch}
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
    spec = dataclass_from_args(TargetSpec, args)
    cfg = dataclass_from_args(DecodeConfig, args)
    if args.threads < 0:
        raise ConfigError(f"--threads={args.threads}: must be >= 0")
    if args.repeats < 1:
        raise ConfigError(f"--repeats={args.repeats}: must be >= 1")
    if args.repeats > 1 and (args.sweep_batch or args.forward_cost):
        raise ConfigError("--repeats applies to a --methods run; --sweep-batch and "
                          "--forward-cost take one timing per cell (repeat a batch sweep with "
                          "the theorem_1_3_batch sweep, which decodes each cell with --repeats)")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    drafted = args.sweep_batch or any(m in DRAFTED for m in methods)
    if args.draft is None and drafted and not args.forward_cost:
        args.draft = DEFAULT
        say(f"--draft: none given; using the draft shipped for {spec.target} ({DEFAULT})")
    if args.forward_cost:
        return run_forward_cost(spec, args)
    prompts = load_bench_prompts(args.prompts, args.num_prompts)
    if args.sweep_batch:
        report = run_batch_sweep(spec, cfg, prompts, int_list("--sweep-batch", args.sweep_batch),
                                 widths(args.sweep_top_k), args.draft)
        report["prompts"] = args.prompts or SHAREGPT_VAL
        if not args.no_mlflow:
            log_sweep_to_mlflow(report, spec)
        say(format_sweep(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
    report = run_bench(spec, cfg, methods, prompts, args.draft,
                       log=lambda line: say(line, flush=True), repeats=args.repeats)
    report["prompts"] = args.prompts or SHAREGPT_VAL
    if not args.no_mlflow:
        log_to_mlflow(report, spec)
    say(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        say(f"report written to {args.json}")
    return 0
