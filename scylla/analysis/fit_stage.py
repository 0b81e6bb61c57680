"""``scylla fit`` (stage ``fit``): fit one log-linear law to runs in MLflow and log it.

Logs ``law/slope``, ``law/intercept``, ``law/r2``, ``law/slope_ci_low/high``,
``law/extrap_error`` (and the rest of ``LawFit.metrics``), with ``points.csv`` (the law's
points), ``runs.csv`` (the rows behind them), ``fit.json`` and ``figure.png`` as artifacts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from scylla.errors import DataError


@dataclass(frozen=True)
class FitSpec:
    """What to fit: the same fields as the flags and as a sweep's ``fits:`` entries."""

    experiment: str
    stage: str
    x: str
    y: str
    name: str = ""
    unit: str = ""  # resampled column (seed, prompt); "" resamples rows at each x
    paired: bool = False  # units shared by every x, resampled jointly
    filter: str = ""  # MLflow filter ANDed to the stage's runs
    best_by: str = ""  # keep the best run by this metric per x (and unit)
    n_boot: int = 2000
    ci: float = 0.95

    def params(self) -> dict[str, Any]:
        return {"fit": self.name, "source_experiment": self.experiment,
                "source_stage": self.stage, "x": self.x, "y": self.y, "unit": self.unit,
                "paired": self.paired, "filter": self.filter, "best_by": self.best_by,
                "n_boot": self.n_boot, "ci": self.ci}


def select_runs(spec: FitSpec) -> pd.DataFrame:
    """The rows the law is fitted on."""
    from scylla.analysis.runs import best_per, load_runs

    runs = load_runs(spec.experiment, spec.stage, spec.filter or None)
    if runs.empty:
        raise DataError(f"fit {spec.name or spec.y}: no finished {spec.stage!r} runs in "
                        f"experiment {spec.experiment!r}"
                        + (f" matching {spec.filter!r}" if spec.filter else ""))
    if spec.best_by:
        runs = best_per(runs, [spec.x, *([spec.unit] if spec.unit else [])], spec.best_by)
    return runs


def inputs_digest(runs: pd.DataFrame) -> str:
    """Names the exact set of input runs: a fit is reused only for the same inputs."""
    return hashlib.sha256(",".join(sorted(runs["run_id"])).encode()).hexdigest()[:16]


def fit_and_log(spec: FitSpec, log: bool = True) -> Any:
    """Fit ``spec`` and (``log``) record it as a ``fit`` stage run; returns the LawFit."""
    import matplotlib.pyplot as plt

    from scylla import tracking
    from scylla.analysis.fit import fit_loglinear
    from scylla.analysis.plots import plot_law

    runs = select_runs(spec)
    fit = fit_loglinear(runs, spec.x, spec.y, unit=spec.unit or None, paired=spec.paired,
                        n_boot=spec.n_boot, ci=spec.ci)
    if not log:
        return fit
    experiment = tracking.run_context().get("experiment") or spec.experiment
    params = {**spec.params(), "inputs": inputs_digest(runs), "n_inputs": len(runs)}
    with tracking.stage_run("fit", params, experiment=experiment,
                            run_name=f"fit-{spec.name or spec.y}"):
        import mlflow

        mlflow.log_metrics(fit.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            fit.points.to_csv(out / "points.csv", index=False)
            keep = [c for c in ("run_id", spec.x, spec.y, spec.unit, "seed") if c in runs]
            runs[list(dict.fromkeys(keep))].to_csv(out / "runs.csv", index=False)
            (out / "fit.json").write_text(json.dumps(
                {**fit.summary(), "equation": fit.equation(), **fit.metrics()}, indent=1,
                default=str))
            fig = plot_law(runs, fit, hue=spec.unit or None)
            fig.savefig(out / "figure.png", dpi=120)
            plt.close(fig)
            mlflow.log_artifacts(str(out))
    return fit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the runs.")
    parser.add_argument("--stage", default="train", help="Stage tag of the runs to fit.")
    parser.add_argument("--x", required=True, help="Param on the log axis (train_tokens).")
    parser.add_argument("--y", required=True, help="Metric or param fitted (val/tau_chain).")
    parser.add_argument("--name", default="", help="Name of the law (run name, param).")
    parser.add_argument("--unit", default="", help="Column resampled by the bootstrap "
                        "(seed, prompt); default: rows at each x.")
    parser.add_argument("--paired", action="store_true", help="The units are shared by "
                        "every x (the same prompts): resample them jointly.")
    parser.add_argument("--filter", default="", help="MLflow filter ANDed to the stage's runs, "
                        "e.g. \"params.method = 'tree'\".")
    parser.add_argument("--best-by", default="", help="Keep, per x (and unit), only the run "
                        "with the highest value of this metric.")
    parser.add_argument("--n-boot", type=int, default=2000, help="Bootstrap resamples.")
    parser.add_argument("--ci", type=float, default=0.95, help="Confidence level.")
    parser.add_argument("--no-mlflow", action="store_true", help="Print only; log nothing.")


def run(args: argparse.Namespace) -> int:
    spec = FitSpec(experiment=args.experiment, stage=args.stage, x=args.x, y=args.y,
                   name=args.name, unit=args.unit, paired=args.paired, filter=args.filter,
                   best_by=args.best_by, n_boot=args.n_boot, ci=args.ci)
    fit = fit_and_log(spec, log=not args.no_mlflow)
    lo, hi = fit.slope_ci
    print(f"{spec.name or 'law'}: {fit.equation()}  R²={fit.r2:.4f}  slope CI "
          f"[{lo:.4f}, {hi:.4f}]  extrapolation error {fit.extrap_error:.4f} "
          f"(within CI: {fit.extrap_within_ci})")
    print(fit.points.to_string(index=False))
    return 0
