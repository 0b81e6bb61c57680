"""``scylla fit`` (stage ``fit``): fit one log-linear law to runs in MLflow and log it.

Logs ``law/slope``, ``law/intercept``, ``law/r2``, ``law/slope_ci_low/high``,
``law/extrap_error`` (and the rest of ``LawFit.metrics``), with ``points.csv`` (the law's
points), ``runs.csv`` (the rows behind them), ``fit.json`` and ``figure.png`` as artifacts.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlflow

from scylla.analysis.law import FitSpec, fit_law, inputs_digest, write_fit
from scylla.commands.cli import say
from scylla.pipeline.tracking import run_context, stage_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the runs.")
    parser.add_argument("--stage", default="train", help="Stage tag of the runs to fit.")
    parser.add_argument("--x", required=True, help="Param on the log axis (train_tokens).")
    parser.add_argument("--y", required=True, help="Metric or param fitted (val/tau_chain).")
    parser.add_argument("--name", default=FitSpec.name, help="Name of the law (run name, param).")
    parser.add_argument("--unit", default=FitSpec.unit, help="Column resampled by the bootstrap "
                        "(seed, prompt); default: rows at each x.")
    parser.add_argument("--paired", action="store_true", help="The units are shared by "
                        "every x (the same prompts): resample them jointly.")
    parser.add_argument("--filter", default=FitSpec.filter, help="MLflow filter ANDed to the "
                        "stage's runs, e.g. \"params.method = 'tree'\".")
    parser.add_argument("--best-by", default=FitSpec.best_by, help="Keep, per x (and unit), "
                        "only the run with the highest value of this metric.")
    parser.add_argument("--n-boot", type=int, default=FitSpec.n_boot, help="Bootstrap resamples.")
    parser.add_argument("--ci", type=float, default=FitSpec.ci, help="Confidence level.")
    parser.add_argument("--no-mlflow", action="store_true", help="Print only; log nothing.")


def run(args: argparse.Namespace) -> int:
    spec = FitSpec(experiment=args.experiment, stage=args.stage, x=args.x, y=args.y,
                   name=args.name, unit=args.unit, paired=args.paired, filter=args.filter,
                   best_by=args.best_by, n_boot=args.n_boot, ci=args.ci)
    fit, runs = fit_law(spec)
    if not args.no_mlflow:
        experiment = run_context().get("experiment") or spec.experiment
        params = {**spec.params(), "inputs": inputs_digest(runs), "n_inputs": len(runs)}
        with stage_run("fit", params, experiment=experiment,
                       run_name=f"fit-{spec.name or spec.y}"):
            mlflow.log_metrics(fit.metrics())
            with tempfile.TemporaryDirectory() as tmp:
                write_fit(spec, fit, runs, Path(tmp))
                mlflow.log_artifacts(tmp)
    lo, hi = fit.slope_ci
    say(f"{spec.name or 'law'}: {fit.equation()}  R²={fit.r2:.4f}  slope CI "
          f"[{lo:.4f}, {hi:.4f}]  extrapolation error {fit.extrap_error:.4f} "
          f"(within CI: {fit.extrap_within_ci})")
    say(fit.points.to_string(index=False))
    return 0
