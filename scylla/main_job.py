"""``scylla main``: the default end-to-end job that the README's first command runs.

Today: the baseline benchmark on the offline target, ``hf`` against our ``plain`` decoding on
held-out ShareGPT prompts, logged to MLflow. It grows into the full reproduction (sweeps,
fits, notebooks) as the pipeline stages land.
"""
from __future__ import annotations

import argparse

from scylla.config import DecodeConfig, TargetSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from scylla.bench import format_table, load_bench_prompts, log_to_mlflow, run_bench

    spec = TargetSpec()
    prompts = load_bench_prompts(None, args.num_prompts)
    for batch in (1, 8):
        cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, decode_batch_size=batch)
        report = run_bench(spec, cfg, ["hf", "plain"], prompts)
        log_to_mlflow(report, spec)
        print(format_table(report), end="\n\n")
    return 0
