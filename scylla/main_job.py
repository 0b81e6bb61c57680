"""``scylla main``: the default end-to-end job that the README's first command runs.

1. The baseline benchmark on the offline target: transformers' ``generate`` (``hf``) against
   our ``plain`` decoding, decode batch sizes 1 and 8, held-out ShareGPT prompts.
2. The reproduction: every sweep in ``pipelines/sweeps`` at the profile named by
   ``SCYLLA_PROFILE`` (``quick`` by default, ``paper`` for the hours-long runs), stage by
   stage with run reuse, then the notebooks rendered into ``notebooks/report/index.html``.
Everything is logged to MLflow (``mlruns/mlflow.db``); a killed job started again finishes
only what is missing.
"""
from __future__ import annotations

import argparse
import os

from scylla.config import DecodeConfig, TargetSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=20,
                        help="Prompts of the baseline benchmark.")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="New tokens per prompt in the baseline benchmark.")
    parser.add_argument("--profile", default=os.environ.get("SCYLLA_PROFILE", "quick"),
                        help="Sweep profile: quick (minutes) or paper (hours). "
                             "Default: $SCYLLA_PROFILE, else quick.")
    parser.add_argument("--skip-sweeps", action="store_true",
                        help="Only the baseline benchmark.")


def run(args: argparse.Namespace) -> int:
    from scylla.bench import Bench, format_table, load_bench_prompts, log_to_mlflow, run_bench

    spec = TargetSpec()
    prompts = load_bench_prompts(None, args.num_prompts)
    bench = Bench.load(spec, None)  # one load of both models for both batch sizes
    for batch in (1, 8):
        cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, decode_batch_size=batch)
        report = run_bench(spec, cfg, ["hf", "plain"], prompts, bench=bench)
        log_to_mlflow(report, spec)
        print(format_table(report), end="\n\n")
    if not args.skip_sweeps:
        from scylla.sweep import reproduce

        index = reproduce(args.profile)
        print(f"report: {index}")
    return 0
