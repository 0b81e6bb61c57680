"""``scylla hidden-states``: run the frozen target over the corpus and write the shards
(``scylla.data.hidden_states``), logged as one ``hidden_states`` stage run.

``--answers target`` writes the shards over the target's own answers to the corpus's first user
turns instead (``scylla.data.target_text``), decoded in the forwards that record the features.
"""
from __future__ import annotations

import argparse

import mlflow

from scylla.commands.cli import add_dataclass_args, dataclass_from_args, say
from scylla.config import TargetSpec, as_params
from scylla.data.hidden_states import (
    SPLIT_DIRS,
    HiddenStatesConfig,
    build_hidden_states,
)
from scylla.data.target_text import build_target_text
from scylla.modeling.targets import load_target
from scylla.pipeline.tracking import stage_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TargetSpec)
    add_dataclass_args(parser, HiddenStatesConfig)
    parser.add_argument("--no-mlflow", action="store_true", help="Do not log an MLflow run.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args: argparse.Namespace) -> int:
    spec = dataclass_from_args(TargetSpec, args)
    cfg = dataclass_from_args(HiddenStatesConfig, args)
    target = load_target(spec)
    params = {**as_params(spec), **as_params(cfg)}
    build = build_target_text if cfg.answers == "target" else build_hidden_states
    if args.no_mlflow:
        res = build(target, cfg, progress=not args.no_progress)
    else:
        with stage_run("hidden_states", params):
            res = build(target, cfg, progress=not args.no_progress)
            mlflow.set_tag("shards", res["root"])
            for split in SPLIT_DIRS:
                if split in res:
                    s = res[split]
                    mlflow.log_metrics({
                        f"hidden_states/{split}_tokens_built": s["tokens_built"],
                        f"hidden_states/{split}_total_tokens": s["total_tokens"],
                        f"hidden_states/{split}_shards": s["shards"],
                        f"hidden_states/{split}_tokens_per_s":
                            s["tokens_built"] / max(s["seconds"], 1e-9)})
                    if "answers" in s:
                        mlflow.log_metrics({
                            f"hidden_states/{split}_{k}": s[k]
                            for k in ("answers", "answer_tokens", "eos_answers",
                                      "prompts_skipped", "forward_tokens")})
    for split in SPLIT_DIRS:
        if split in res:
            s = res[split]
            rate = s["tokens_built"] / max(s["seconds"], 1e-9)
            say(f"{split}: {s['total_tokens']} tokens in {s['shards']} shards "
                  f"({s['tokens_built']} built now, {rate:.0f} tokens/s)"
                  + (" [corpus exhausted]" if s["complete"] else ""))
            if s.get("answers"):  # answers decoded past the last shard are counted, not kept
                say(f"  target answers: {s['answers']} decoded ({s['answer_tokens']} tokens, "
                    f"{s['eos_answers']} ended by EOS), {s['prompts_skipped']} prompts "
                    f"skipped; {s['forward_tokens']} tokens through the target "
                    f"({s['forward_tokens'] / max(s['seconds'], 1e-9):.0f} tokens/s)")
    say(f"shards: {res['root']}")
    return 0
