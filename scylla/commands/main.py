"""``scylla main``: the default end-to-end job that the README's first command runs.

1. The baseline benchmark on the offline target: transformers' ``generate`` (``hf``) against
   our ``plain`` decoding and, with the draft shipped for the target, ``hybrid`` decoding
   (sized by the planner), decode batch sizes 1 and 8, held-out ShareGPT prompts.
2. The reproduction: every sweep in ``pipelines/sweeps`` at the profile named by
   ``SCYLLA_PROFILE`` (``quick`` by default, ``paper`` for the hours-long runs), stage by
   stage with run reuse, then the notebooks rendered into ``<out>/report/index.html``.
Everything is logged to the MLflow store ``<out>/mlruns/mlflow.db`` (``--out``, default ``out/``,
ignored by git), so the job never writes over the committed results in ``mlruns/`` and
``notebooks/report/``; a killed job started again finishes only what is missing.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from scylla import paths
from scylla.commands.bench import (
    SHAREGPT_VAL,
    format_table,
    load_bench,
    load_bench_prompts,
    log_to_mlflow,
    run_bench,
)
from scylla.commands.cli import add_profile_argument
from scylla.config import DecodeConfig, TargetSpec
from scylla.drafts.io import DEFAULT, is_shipped
from scylla.pipeline.sweep import reproduce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=20,
                        help="Prompts of the baseline benchmark.")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="New tokens per prompt in the baseline benchmark.")
    add_profile_argument(parser, "Sweep profile")
    parser.add_argument("--skip-sweeps", action="store_true",
                        help="Only the baseline benchmark.")
    parser.add_argument("--out", default="out",
                        help="Directory of the job's MLflow store (mlruns/) and report "
                             "(report/); default out/. MLFLOW_TRACKING_URI, when set, names "
                             "the store instead.")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    store = {} if os.environ.get("SCYLLA_STORE_DIR") else {"SCYLLA_STORE_DIR": str(out / "mlruns")}
    with paths.environment(store):
        return job(args, out)


def job(args: argparse.Namespace, out: Path) -> int:
    spec = TargetSpec()
    prompts = load_bench_prompts(None, args.num_prompts)
    # the shipped draft, when there is one for the target, decodes beside them (hybrid, sized
    # by the planner for this machine and batch size)
    draft = DEFAULT if is_shipped(spec.target) else None
    methods = ["hf", "plain"] + (["hybrid"] if draft else [])
    bench = load_bench(spec, draft)  # one load of the models for both batch sizes
    for batch in (1, 8):
        cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, decode_batch_size=batch)
        report = run_bench(spec, cfg, methods, prompts, draft, bench=bench,
                           log=lambda line: print(f"baseline, batch {batch}: {line}", flush=True))
        report["prompts"] = SHAREGPT_VAL
        log_to_mlflow(report, spec)
        print(format_table(report), end="\n\n")
    if not args.skip_sweeps:
        index = reproduce(args.profile, report_dir=out / "report")
        print(f"report: {index}")
    return 0
