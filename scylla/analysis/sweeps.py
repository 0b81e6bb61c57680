"""A sweep's results as the notebooks read them: the same fit specs as the ``fit`` stage
(the sweep file's ``fits:``), applied to the runs in the sweep's MLflow experiment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from scylla.analysis.fit import LawFit, fit_loglinear, fits_table
from scylla.analysis.law import FitSpec, select_runs
from scylla.analysis.runs import load_runs
from scylla.errors import DataError
from scylla.experiments import experiment_name, load_sweep, sweep_paths


@dataclass
class FitResult:
    name: str
    runs: pd.DataFrame  # the rows fitted
    fit: LawFit


def sweep_fits(sweep: str, profile: str, simulated: bool = False) -> dict[str, FitResult]:
    """Every fit the sweep file's profile declares, on the runs its experiment holds now.
    A fit whose runs are missing (a stage not run yet) is left out with a printed note."""
    spec = load_sweep(sweep)
    experiment = experiment_name(spec.name, profile, simulated)
    out = {}
    for f in spec.profile(profile).fits:
        fs = FitSpec(experiment=experiment, **f)
        try:
            runs = select_runs(fs)
            fit = fit_loglinear(runs, fs.x, fs.y, unit=fs.unit or None, paired=fs.paired)
        except DataError as e:
            print(f"{f['name']}: not fitted: {e}")
            continue
        out[f["name"]] = FitResult(f["name"], runs, fit)
    return out


def save_points(frame: LawFit | pd.DataFrame, directory: str | Path, name: str) -> Path:
    """The points behind a figure as ``<directory>/<name>.csv`` (a LawFit: its points). A named
    index (a table's rows: category, batch size) is a column of the file; a plain row number is
    not."""
    table = frame.points if isinstance(frame, LawFit) else frame
    path = Path(directory) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=any(n is not None for n in table.index.names))
    return path


def overview(profile: str, simulated: bool = False) -> dict[str, pd.DataFrame]:
    """Tables for the overview: runs per sweep and stage, every law, the τ/speed table."""
    sweeps = [load_sweep(p) for p in sweep_paths()]
    inventory_rows, law_rows = [], []
    for s in sweeps:
        exp = experiment_name(s.name, profile, simulated)
        runs = load_runs(exp, finished_only=False, latest_per_point=False)
        counts = runs.groupby(["stage", "status"]).size() if not runs.empty else pd.Series()
        for (stage, status), n in counts.items():
            inventory_rows.append({"sweep": s.name, "stage": stage, "status": status, "runs": n})
        for name, r in sweep_fits(s.name, profile, simulated).items():
            law_rows.append({"sweep": s.name, "law": name, **fits_table(r.fit).iloc[0]})
    return {"inventory": pd.DataFrame(inventory_rows), "laws": pd.DataFrame(law_rows),
            "speed": speed_table(experiment_name("baselines", profile, simulated))}


def speed_table(experiment: str) -> pd.DataFrame:
    """τ, tokens/s and speed-up per draft variant and batch size (tree decoding)."""
    runs = load_runs(experiment, stage="decode", filter_string="params.method = 'tree'")
    cols = ["decode/tau", "decode/tokens_per_s", "decode/speedup"]
    if runs.empty or "variant" not in runs.columns:
        return pd.DataFrame(columns=["variant", "decode_batch_size", *cols])
    return (runs.groupby(["variant", "decode_batch_size"])[[c for c in cols if c in runs]]
            .mean().reset_index())


def headline_markdown(tables: dict[str, Any]) -> str:
    """The README's headline: each law with its CI and R², and the τ/speed table."""
    lines = ["| sweep | law | slope [95% CI] | R² of the means / of the runs | "
             "extrapolation error (within CI) |", "|---|---|---|---|---|"]
    for _, r in tables["laws"].iterrows():
        lines.append(f"| {r['sweep']} | {r['y']} ~ ln({r['x']}) | {r['slope']:.3f} "
                     f"[{r['slope_ci_low']:.3f}, {r['slope_ci_high']:.3f}] | {r['r2']:.3f} / "
                     f"{r['r2_runs']:.3f} | "
                     f"{r['extrap_error']:.3f} ({r['extrap_within_ci']}) |")
    speed = tables["speed"]
    if not speed.empty:
        lines += ["", "| draft | batch | τ | tokens/s | speed-up |", "|---|---|---|---|---|"]
        for _, r in speed.iterrows():
            lines.append(f"| {r['variant']} | {int(r['decode_batch_size'])} | "
                         f"{r.get('decode/tau', float('nan')):.2f} | "
                         f"{r.get('decode/tokens_per_s', float('nan')):.1f} | "
                         f"{r.get('decode/speedup', float('nan')):.2f}× |")
    return "\n".join(lines)


def save_headline(tables: dict[str, Any], directory: str | Path) -> Path:
    """``headline_markdown`` as ``<directory>/headline.md``."""
    path = Path(directory) / "headline.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(headline_markdown(tables) + "\n")
    return path
