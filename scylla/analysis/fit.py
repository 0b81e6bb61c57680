"""Log-linear laws ``y = intercept + slope * ln(x)`` with bootstrap CIs and an extrapolation
check.

The fit is on the law's *points*: one per distinct ``x``, the mean of ``y`` over the runs (or
prompts, categories...) at that ``x``; with ``ratio=(num, den)`` the point is
``sum(num) / sum(den)`` instead (τ from raw counts, never a mean of ratios).

Bootstrap: at each x, the units there (``unit``: seeds, prompts; default: rows) are
resampled with replacement, independently per x (a seed at one budget is its own training
run). With ``paired=True`` the units are drawn once for all x, for units shared by every
point (the same prompts decoded by every draft). Each resampled point's deviation is widened
by sqrt(n/(n-1)), and the percentile interval by t/z for the degrees of freedom the spread
is known from: small-sample corrections without which 2-3 seeds give CIs far too narrow
(95% intervals covering ~75%). Without replicates (one unit per x) there is no spread to
resample, and the CIs are NaN rather than falsely narrow.

Extrapolation: fit on every point but the largest x, predict that point, and report
``measured - predicted``; its bootstrap CI comes from the same resamples, so "within CI"
means the held-out point is consistent with the law fitted without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression

from scylla.errors import DataError

N_BOOT = 2000


@dataclass
class LawFit:
    """One fitted law and the evidence behind it."""

    x: str
    y: str
    slope: float
    intercept: float
    r2: float
    n_points: int
    n_rows: int
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    ci: float
    points: pd.DataFrame  # x, y, n, y_low, y_high (bootstrap CI of each point)
    extrap_x: float = math.nan
    extrap_measured: float = math.nan
    extrap_predicted: float = math.nan
    extrap_error: float = math.nan
    extrap_error_ci: tuple[float, float] = (math.nan, math.nan)
    group: dict[str, Any] = field(default_factory=dict)
    # the same line against every run rather than the mean per x (``r2``): how much of the
    # runs' own spread the law explains (NaN for ratio points, which have no per-run y)
    r2_runs: float = math.nan

    def predict(self, x: Any) -> Any:
        return self.intercept + self.slope * np.log(x)

    @property
    def slope_excludes_zero(self) -> bool:
        lo, hi = self.slope_ci
        return bool(lo > 0 or hi < 0)

    @property
    def extrap_within_ci(self) -> bool | None:
        lo, hi = self.extrap_error_ci
        if math.isnan(lo):
            return None
        return bool(lo <= 0 <= hi)

    def equation(self, digits: int = 3) -> str:
        sign = "+" if self.slope >= 0 else "-"
        return (f"{self.y} = {self.intercept:.{digits}f} {sign} "
                f"{abs(self.slope):.{digits}f}·ln({self.x})")

    def metrics(self, prefix: str = "law/") -> dict[str, float]:
        """The numbers ``scylla fit`` logs (NaN ones are left out: MLflow stores no NaN)."""
        m = {"slope": self.slope, "intercept": self.intercept, "r2": self.r2,
             "slope_ci_low": self.slope_ci[0], "slope_ci_high": self.slope_ci[1],
             "intercept_ci_low": self.intercept_ci[0], "intercept_ci_high": self.intercept_ci[1],
             "r2_runs": self.r2_runs, "n_points": self.n_points, "n_rows": self.n_rows,
             "extrap_x": self.extrap_x, "extrap_measured": self.extrap_measured,
             "extrap_predicted": self.extrap_predicted, "extrap_error": self.extrap_error,
             "extrap_error_ci_low": self.extrap_error_ci[0],
             "extrap_error_ci_high": self.extrap_error_ci[1]}
        if self.extrap_within_ci is not None:
            m["extrap_within_ci"] = float(self.extrap_within_ci)
        return {prefix + k: float(v) for k, v in m.items() if not math.isnan(float(v))}

    def summary(self) -> dict[str, Any]:
        """One row for a table of fits."""
        return {**self.group, "x": self.x, "y": self.y, "slope": self.slope,
                "slope_ci_low": self.slope_ci[0], "slope_ci_high": self.slope_ci[1],
                "intercept": self.intercept, "r2": self.r2, "r2_runs": self.r2_runs,
                "n_points": self.n_points,
                "n_rows": self.n_rows, "extrap_error": self.extrap_error,
                "extrap_within_ci": self.extrap_within_ci}


def _closed_form(lx: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS slope/intercept of each row of ``ys`` (R, P) on ``lx`` (P,): the same least
    squares as LinearRegression, vectorised over thousands of resamples."""
    lxc = lx - lx.mean()
    slope = (ys - ys.mean(axis=1, keepdims=True)) @ lxc / (lxc @ lxc)
    return slope, ys.mean(axis=1) - slope * lx.mean()


class _Resampler:
    """Bootstrap replicates of the law's points, shape (R, P)."""

    def __init__(self, df: pd.DataFrame, x: str, y: str, unit: str | None, paired: bool,
                 ratio: tuple[str, str] | None, levels: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        num, den = ratio if ratio else (y, None)
        key = unit if unit else "_row"
        df = df.assign(_row=np.arange(len(df)), _one=1.0)
        den = den or "_one"
        # per (level, unit) sums: (P, U) matrices; a unit absent at a level contributes 0/0
        grouped = df.groupby([x, key])[[num, den]].sum()
        self.units = grouped.index.get_level_values(1).unique()
        self.num = grouped[num].unstack(fill_value=0.0).reindex(
            index=levels, columns=self.units, fill_value=0.0).to_numpy(float)
        self.den = grouped[den].unstack(fill_value=0.0).reindex(
            index=levels, columns=self.units, fill_value=0.0).to_numpy(float)
        self.paired = paired
        per_level = (self.den > 0).sum(axis=1)  # (P,) units at each x
        self.replicated = bool((per_level >= 2).any())
        # degrees of freedom of the spread the resamples see
        self.dof = len(self.units) - 1 if paired else int(np.maximum(per_level - 1, 0).sum())

    def draw(self, n: int) -> np.ndarray:
        """(n, P) resampled points; rows where some point lost all its units are NaN."""
        P, U = self.num.shape
        if self.paired:
            counts = np.stack([np.bincount(self.rng.integers(0, U, U), minlength=U)
                               for _ in range(n)]).astype(float)  # (n, U)
            num, den = counts @ self.num.T, counts @ self.den.T  # (n, P)
        else:
            num, den = np.empty((n, P)), np.empty((n, P))
            for p in range(P):
                present = np.flatnonzero(self.den[p] > 0)
                pick = present[self.rng.integers(0, len(present), (n, len(present)))]
                num[:, p], den[:, p] = self.num[p, pick].sum(1), self.den[p, pick].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            points = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        # A resampled mean of n units spreads sqrt((n-1)/n) times its standard error (82% at
        # n = 3, where seeds usually are): widen each point's deviations back to full size.
        n = (self.den > 0).sum(axis=1) if not self.paired else np.full(P, U)  # (P,)
        inflate = np.sqrt(n / np.maximum(n - 1, 1))
        return self.point_y + (points - self.point_y) * inflate

    @property
    def point_y(self) -> np.ndarray:
        """The law's points: (P,) sum(num)/sum(den) per x."""
        return self.num.sum(1) / self.den.sum(1)


def _quantiles(values: np.ndarray, ci: float, center: float = math.nan, widen: float = 1.0
               ) -> tuple[float, float]:
    """Percentile interval, its arms around ``center`` stretched by ``widen``."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    if widen != 1.0:
        lo, hi = center - (center - lo) * widen, center + (hi - center) * widen
    return (float(lo), float(hi))


def _t_widening(dof: int, ci: float) -> float:
    """Student-t over normal quantile: the bootstrap knows the spread only from ``dof``
    degrees of freedom (2 seeds x 5 budgets: 5), so its normal-like percentiles are too
    narrow by this factor (1.31 at dof 5, 95%)."""
    from scipy.stats import norm, t

    q = (1 + ci) / 2
    return float(t.ppf(q, dof) / norm.ppf(q)) if dof >= 1 else 1.0


def fit_loglinear(df: pd.DataFrame, x: str, y: str, group: str | list[str] | None = None,
                  *, unit: str | None = None, paired: bool = False,
                  ratio: tuple[str, str] | None = None, n_boot: int = N_BOOT, ci: float = 0.95,
                  seed: int = 0) -> LawFit | dict[Any, LawFit]:
    """Fit ``y = intercept + slope·ln(x)``; with ``group``, one fit per group value (dict).

    ``ratio=(num, den)``: each point is ``sum(num)/sum(den)`` over its rows and ``y`` only
    names the result. Rows missing ``x`` or ``y`` are dropped; ``x`` must be > 0.
    """
    if group is not None:
        keys = [group] if isinstance(group, str) else list(group)
        fits = {}
        for value, part in df.groupby(keys if len(keys) > 1 else keys[0], sort=True):
            f = fit_loglinear(part, x, y, unit=unit, paired=paired, ratio=ratio,
                              n_boot=n_boot, ci=ci, seed=seed)
            f.group = dict(zip(keys, value if isinstance(value, tuple) else (value,)))
            fits[value] = f
        return fits
    value_cols = list(ratio) if ratio else [y]
    for c in [x, *value_cols, *([unit] if unit else [])]:
        if c not in df.columns:
            raise DataError(f"fit {y} ~ ln({x}): no column {c!r} in the runs "
                            f"(columns: {', '.join(map(str, df.columns))})")
    rows = df.dropna(subset=[x, *value_cols]).copy()
    rows[x] = pd.to_numeric(rows[x])
    for c in value_cols:
        rows[c] = pd.to_numeric(rows[c])
    if (rows[x] <= 0).any():
        raise DataError(f"fit {y} ~ ln({x}): {x} must be > 0, got {rows[x].min()}")
    levels = np.sort(rows[x].unique()).astype(float)
    if len(levels) < 2:
        raise DataError(f"fit {y} ~ ln({x}): need at least 2 distinct {x} values, got "
                        f"{len(levels)} from {len(rows)} runs")
    rng = np.random.default_rng(seed)
    if paired and unit is None:
        raise DataError(f"fit {y} ~ ln({x}): paired=True needs a unit column")
    boot = _Resampler(rows, x, y, unit, paired, ratio, levels, rng)
    point_y = boot.point_y  # (P,)
    lx = np.log(levels)
    reg = LinearRegression().fit(lx[:, None], point_y)
    r2 = float(reg.score(lx[:, None], point_y)) if np.ptp(point_y) > 0 else math.nan
    samples = boot.draw(n_boot) if boot.replicated else np.full((1, len(levels)), np.nan)
    samples = samples[np.isfinite(samples).all(axis=1)]
    slopes, intercepts = _closed_form(lx, samples) if len(samples) else (np.array([]),) * 2
    widen = _t_widening(boot.dof, ci)
    point_ci = [_quantiles(samples[:, p], ci, point_y[p], widen) for p in range(len(levels))]
    counts = rows.groupby(x).size().reindex(levels).to_numpy()
    points = pd.DataFrame({x: levels, y: point_y, "n": counts,
                           "y_low": [c[0] for c in point_ci],
                           "y_high": [c[1] for c in point_ci]})
    slope, intercept = float(reg.coef_[0]), float(reg.intercept_)

    def fit_line(v: pd.Series) -> np.ndarray:
        return intercept + slope * np.log(v.to_numpy(dtype=float))

    fit = LawFit(x=x, y=y, slope=slope, intercept=intercept, r2=r2, n_points=len(levels),
                 n_rows=len(rows), slope_ci=_quantiles(slopes, ci, slope, widen),
                 intercept_ci=_quantiles(intercepts, ci, intercept, widen), ci=ci,
                 points=points, r2_runs=math.nan if ratio else _r2(rows[x], rows[y], fit_line))
    if len(levels) >= 3:
        _extrapolate(fit, levels, point_y, samples, ci, widen)
    return fit


def _r2(xs: pd.Series, ys: pd.Series, line: Any) -> float:
    """R² of ``line`` against the rows themselves (NaN when they do not vary)."""
    y = ys.to_numpy(dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - line(xs)) ** 2).sum()) / total if total > 0 else math.nan


def _extrapolate(fit: LawFit, levels: np.ndarray, point_y: np.ndarray, samples: np.ndarray,
                 ci: float, widen: float) -> None:
    """Fit without the largest x, predict it, and bootstrap the error."""
    lx = np.log(levels)
    held = LinearRegression().fit(lx[:-1, None], point_y[:-1])
    fit.extrap_x = float(levels[-1])
    fit.extrap_measured = float(point_y[-1])
    fit.extrap_predicted = float(held.predict(lx[-1:, None])[0])
    fit.extrap_error = fit.extrap_measured - fit.extrap_predicted
    if len(samples):
        s, b = _closed_form(lx[:-1], samples[:, :-1])
        fit.extrap_error_ci = _quantiles(samples[:, -1] - (b + s * lx[-1]), ci,
                                         fit.extrap_error, widen)


def fits_table(fits: LawFit | dict[Any, LawFit] | list[LawFit]) -> pd.DataFrame:
    """Fits as a table, one row each."""
    if isinstance(fits, LawFit):
        fits = [fits]
    elif isinstance(fits, dict):
        fits = list(fits.values())
    return pd.DataFrame([f.summary() for f in fits])
