"""Seaborn figures, one function per paper artefact; each returns a matplotlib Figure.

Inputs are ``load_runs`` frames and ``fit_loglinear`` results, so a notebook cell is one call.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scylla.analysis.fit import LawFit
from scylla.analysis.runs import best_per, category_table, chain_steps
from scylla.decoding.bench import mean_ci


def axes_figure(ncols: int = 1, width: float = 5.5) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4), squeeze=False)
    return fig, list(axes[0])


def log_x(ax: Any, ticks: Any = None) -> None:
    """A log x axis labelled with plain numbers (8, 1e+06), ticked at ``ticks`` if given."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    if ticks is not None:
        ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def law_panel(ax: Any, runs: pd.DataFrame, fit: LawFit, hue: str | None = None,
              label: str | None = None) -> None:
    """Runs as dots, the law's points with their bootstrap CI, the fitted line; log x."""
    x, y = fit.x, fit.y
    if y in runs.columns and x in runs.columns:
        groups = runs.groupby(hue) if hue in runs.columns else [(None, runs)]
        for i, (value, part) in enumerate(groups):
            ax.scatter(part[x], part[y], s=24, alpha=0.5, color=f"C{i}",
                       label=None if value is None else f"{hue} {value}")
    pts = fit.points
    err = np.vstack([pts[y] - pts["y_low"], pts["y_high"] - pts[y]])
    ax.errorbar(pts[x], pts[y], yerr=None if np.isnan(err).all() else np.abs(err), fmt="o",
                color="black", capsize=3, label="mean (bootstrap CI)")
    grid = np.geomspace(pts[x].min(), pts[x].max(), 100)
    ax.plot(grid, fit.predict(grid), color="C3",
            label=label or f"{fit.equation(2)}, R²={fit.r2:.3f}")
    if not np.isnan(fit.extrap_predicted):
        ax.scatter([fit.extrap_x], [fit.extrap_predicted], marker="x", color="C3", s=60,
                   zorder=5, label="largest x predicted without it")
    # small axes (layers, batch sizes, tree widths) are ticked at their own points; token and
    # parameter counts keep matplotlib's decades, where 6 labels of 7 digits would collide
    log_x(ax, pts[x] if pts[x].max() <= 100 else None)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)


def plot_law(runs: pd.DataFrame, fit: LawFit, hue: str | None = None,
             title: str | None = None) -> Any:
    """Any fitted law (what ``scylla fit`` saves as ``figure.png``)."""
    fig, (ax,) = axes_figure()
    law_panel(ax, runs, fit, hue=hue)
    ax.set_title(title or f"{fit.y} vs ln({fit.x})")
    fig.tight_layout()
    return fig


def plot_theorem_1_1(runs: pd.DataFrame, fit: LawFit) -> Any:
    """Theorem 1.1: τ against the draft's training tokens (log x), one dot per seed."""
    fig = plot_law(runs, fit, hue="seed" if "seed" in runs.columns else None,
                   title="Theorem 1.1: acceptance vs training tokens")
    return fig


def plot_theorem_1_2(runs: pd.DataFrame, fit_layers: LawFit, fit_params: LawFit) -> Any:
    """Theorem 1.2: τ against draft depth and against draft parameter count."""
    fig, (a, b) = axes_figure(2)
    law_panel(a, runs, fit_layers, hue="seed" if "seed" in runs.columns else None)
    a.set_title("Theorem 1.2: acceptance vs draft layers")
    law_panel(b, runs, fit_params, hue="seed" if "seed" in runs.columns else None)
    b.set_title("… and vs draft parameters")
    fig.tight_layout()
    return fig


def plot_chain_steps(runs: pd.DataFrame, x: str) -> Any:
    """Where a draft's chain length comes from, against ``x``: the acceptance at each chain
    step (left) and the probability of reaching past it, whose sum over steps is
    val/tau_chain - 1 (right); one line per step, the band spans the seeds."""
    import seaborn as sns

    steps = chain_steps(runs, keep=[x])
    fig, (a, b) = axes_figure(2)
    for ax, y, title in ((a, "alpha", "acceptance at step i, given steps < i accepted"),
                         (b, "reach", "P(steps 1..i all accepted); τ = 1 + Σ")):
        sns.lineplot(data=steps, x=x, y=y, hue="step", marker="o", palette="crest", ax=ax,
                     errorbar=("pi", 100))
        log_x(ax, steps[x])
        ax.set_title(title, fontsize=10)
    a.get_legend().remove()  # one legend for both panels, where the right one is empty
    b.legend(title="step", fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


BATCH, WIDTH = "decode_batch_size", "tree_total_tokens"


def batch_cells(runs: pd.DataFrame, width: str = WIDTH) -> pd.DataFrame:
    """Theorem 1.3 cell by cell, plain decoding as width 0: per batch size and width the
    timed rounds, mean tokens/s, the mean paired speed-up over plain with its 95% t-interval
    over rounds (NaN with one round), and τ; ``best`` marks each batch size's highest mean
    speed-up (plain's is 1 by definition). ``runs``: the sweep's plain and tree runs."""
    rows = []
    for method, keys in (("tree", [BATCH, width]), ("plain", [BATCH])):
        part = runs[runs["method"] == method]
        for key, cell in part.groupby(keys):
            b, w = (key if method == "tree" else (key[0], 0))
            sp = (mean_ci(cell["decode/speedup"].tolist()) if method == "tree"
                  else (1.0, 1.0, 1.0))
            rows.append({BATCH: int(b), width: int(w), "rounds": len(cell),
                         "tokens_per_s": cell["decode/tokens_per_s"].mean(), "speedup": sp[0],
                         "speedup_ci_low": sp[1], "speedup_ci_high": sp[2],
                         "tau": cell["decode/tau"].mean()})
    cells = pd.DataFrame(rows).sort_values([BATCH, width]).reset_index(drop=True)
    cells["best"] = cells["speedup"] == cells.groupby(BATCH)["speedup"].transform("max")
    return cells


def best_width_per_round(runs: pd.DataFrame, width: str = WIDTH) -> pd.DataFrame:
    """Per batch size and timed round, the width with the highest paired speed-up: plain
    decoding (width 0, speed-up 1) when no tree beats it in that round. Rows ``BATCH,
    repeat, best_width, best_speedup``, to fit with ``unit="repeat"``; runs without rounds
    are round 1."""
    tree = runs[runs["method"] == "tree"]
    rounds = tree["repeat"] if "repeat" in tree.columns else pd.Series(1, index=tree.index)
    rows = []
    top = best_per(tree.assign(repeat=rounds.fillna(1)), [BATCH, "repeat"], "decode/speedup")
    for t in top.to_dict("records"):
        wins = t["decode/speedup"] > 1
        rows.append({BATCH: int(t[BATCH]), "repeat": int(t["repeat"]),
                     "best_width": int(t[width]) if wins else 0,
                     "best_speedup": float(t["decode/speedup"]) if wins else 1.0})
    return pd.DataFrame(rows)


def plot_theorem_1_3(runs: pd.DataFrame, fit_width: LawFit | None = None,
                     width: str = WIDTH) -> Any:
    """Theorem 1.3: the mean speed-up over plain per tree width against batch size (95%
    intervals over rounds; plain = 1), and the best width per batch size (plain = 0)."""
    cells = batch_cells(runs, width)
    fig, (a, b) = axes_figure(2)
    trees = cells[cells[width] > 0]
    for i, (w, part) in enumerate(trees.groupby(width)):
        err = np.vstack([part["speedup"] - part["speedup_ci_low"],
                         part["speedup_ci_high"] - part["speedup"]])
        a.errorbar(part[BATCH], part["speedup"], capsize=3, marker="o", color=f"C{i}",
                   yerr=None if np.isnan(err).all() else np.abs(err), label=f"{w} tokens")
    a.axhline(1.0, color="black", lw=1, ls="--", label="plain decoding")
    log_x(a, cells[BATCH])
    a.set_xlabel(BATCH)
    a.set_ylabel("speed-up over plain (same round)")
    a.legend(fontsize=8, title=width, title_fontsize=8)
    a.set_title("Theorem 1.3: speed-up per tree width")
    if fit_width is not None:
        law_panel(b, best_width_per_round(runs, width), fit_width)
    else:
        best = cells[cells["best"]]
        b.plot(best[BATCH], best[width], "o-")
        log_x(b, best[BATCH])
    b.set_title("best width per batch size (plain = 0)")
    fig.tight_layout()
    return fig


def plot_figure_2(runs: pd.DataFrame, by: str = "variant", metric: str = "decode/tau") -> Any:
    """Figure 2: τ per Spec-Bench task, one bar per draft (``by``)."""
    import seaborn as sns

    long = category_table(runs, by, metric).reset_index().melt(
        id_vars="category", var_name=by, value_name=metric)
    fig, (ax,) = axes_figure(width=9)
    sns.barplot(data=long, x="category", y=metric, hue=by, ax=ax, errorbar=None)
    ax.set_title("Figure 2: acceptance length per category")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def table_5(runs: pd.DataFrame, by: str = "variant", baseline: str = "eagle2-style",
            metric: str = "decode/tokens_per_s") -> pd.DataFrame:
    """Table 5: throughput per batch size per draft, and each ÷ the baseline's."""
    wide = runs.pivot_table(index="decode_batch_size", columns=by, values=metric,
                            aggfunc="mean")
    if baseline not in wide.columns:
        return wide
    ratios = wide.div(wide[baseline], axis=0).add_suffix(f" ÷ {baseline}")
    return pd.concat([wide, ratios.drop(columns=f"{baseline} ÷ {baseline}")], axis=1)


def plot_table_5(runs: pd.DataFrame, by: str = "variant",
                 metric: str = "decode/tokens_per_s") -> Any:
    """Table 5 as a figure: throughput per batch size per draft."""
    import seaborn as sns

    fig, (ax,) = axes_figure(width=7)
    sns.barplot(data=runs, x="decode_batch_size", y=metric, hue=by, ax=ax, errorbar=None)
    ax.set_title("Table 5: throughput per batch size")
    fig.tight_layout()
    return fig
