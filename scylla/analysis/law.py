"""A law as a sweep file or ``scylla fit`` declares it: which runs, selected how, fitted how.

The ``fit`` stage (``scylla.commands.fit``) logs ``LawFit.metrics`` (``law/slope``,
``law/r2``, ``law/slope_ci_low/high``, ``law/extrap_error``...) and the files of ``write_fit``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from scylla.analysis.fit import LawFit, fit_loglinear
from scylla.analysis.plots import plot_law
from scylla.analysis.runs import best_per, load_runs
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


def fit_law(spec: FitSpec) -> tuple[LawFit, pd.DataFrame]:
    """The fitted law and the runs it rests on."""
    runs = select_runs(spec)
    fit = fit_loglinear(runs, spec.x, spec.y, unit=spec.unit or None, paired=spec.paired,
                        n_boot=spec.n_boot, ci=spec.ci)
    return fit, runs


def write_fit(spec: FitSpec, fit: LawFit, runs: pd.DataFrame, out: Path) -> None:
    """The fit's files in directory ``out``: ``points.csv`` (the law's points), ``runs.csv``
    (the rows behind them), ``fit.json`` and ``figure.png``."""
    fit.points.to_csv(out / "points.csv", index=False)
    keep = [c for c in ("run_id", spec.x, spec.y, spec.unit, "seed") if c in runs]
    runs[list(dict.fromkeys(keep))].to_csv(out / "runs.csv", index=False)
    (out / "fit.json").write_text(json.dumps(
        {**fit.summary(), "equation": fit.equation(), **fit.metrics()}, indent=1, default=str))
    fig = plot_law(runs, fit, hue=spec.unit or None)
    fig.savefig(out / "figure.png", dpi=120)
    plt.close(fig)
