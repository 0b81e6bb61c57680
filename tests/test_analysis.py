"""scylla.analysis: runs -> tidy frame, log-linear fits with bootstrap CIs, figures, verdicts,
and the ``fit`` stage, on synthetic runs in a throw-away MLflow store."""
from __future__ import annotations

import math

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

from scylla import analysis as sa
from scylla.errors import DataError
from scylla.pipeline import tracking

matplotlib.use("Agg")


def law_frame(slope=0.2, intercept=1.0, noise=0.02, seeds=(0, 1, 2), xs=(1e4, 3e4, 1e5, 3e5, 1e6),
              rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    rows = [{"train_tokens": x, "seed": s,
             "val/tau_chain": intercept + slope * math.log(x) + rng.normal(0, noise)}
            for x in xs for s in seeds]
    return pd.DataFrame(rows)


# -- fits -------------------------------------------------------------------------------------

def test_fit_recovers_a_known_law_and_its_ci_covers_it():
    fit = sa.fit_loglinear(law_frame(), "train_tokens", "val/tau_chain", unit="seed")
    assert fit.slope == pytest.approx(0.2, abs=0.02)
    assert fit.intercept == pytest.approx(1.0, abs=0.25)
    assert fit.r2 > 0.99
    lo, hi = fit.slope_ci
    assert lo < fit.slope < hi and hi - lo < 0.05
    assert fit.slope_excludes_zero
    assert fit.n_points == 5 and fit.n_rows == 15
    # the extrapolation check: fitted on the 4 smallest budgets, the 5th is predicted well
    assert fit.extrap_x == 1e6
    assert abs(fit.extrap_error) < 0.05 and fit.extrap_within_ci is True
    m = fit.metrics()
    assert {"law/slope", "law/intercept", "law/r2", "law/slope_ci_low", "law/slope_ci_high",
            "law/extrap_error"} <= set(m)


def test_slope_ci_covers_the_true_slope_most_of_the_time():
    # 3 seeds per point; without the small-sample correction this covers ~75% at nominal 95%
    covered = []
    for rng_seed in range(60):
        fit = sa.fit_loglinear(law_frame(rng_seed=rng_seed), "train_tokens", "val/tau_chain",
                               unit="seed", n_boot=400)
        covered.append(fit.slope_ci[0] < 0.2 < fit.slope_ci[1])
    assert np.mean(covered) >= 0.85


def test_a_flat_relation_rarely_has_a_ci_excluding_zero():
    excludes = [sa.fit_loglinear(law_frame(slope=0.0, noise=0.05, rng_seed=r), "train_tokens",
                                 "val/tau_chain", unit="seed", n_boot=400).slope_excludes_zero
                for r in range(40)]
    assert np.mean(excludes) <= 0.15


def test_a_bent_curve_fails_the_extrapolation_check():
    df = law_frame(noise=0.005)
    big = df["train_tokens"] == 1e6
    df.loc[big, "val/tau_chain"] -= 0.5  # a plateau at the largest budget
    fit = sa.fit_loglinear(df, "train_tokens", "val/tau_chain", unit="seed")
    assert fit.extrap_error < -0.4 and fit.extrap_within_ci is False
    # a clear slope and a high R² are not enough for "Supported" when the law misses its end
    df.loc[big, "val/tau_chain"] += 0.44  # a bend of 0.06
    fit = sa.fit_loglinear(df, "train_tokens", "val/tau_chain", unit="seed")
    assert fit.slope_excludes_zero and fit.r2 >= 0.95 and fit.extrap_within_ci is False
    head = sa.verdict_law("theorem_1_1", {"tau": fit}, df).splitlines()[1]
    assert head.startswith("**Partly supported**") and "does not predict" in head


def test_run_level_r2_measures_the_line_against_every_run_not_the_means():
    df = law_frame(noise=0.1, rng_seed=5)
    fit = sa.fit_loglinear(df, "train_tokens", "val/tau_chain", unit="seed")
    y = df["val/tau_chain"].to_numpy()
    resid = y - fit.predict(df["train_tokens"].to_numpy())
    assert fit.r2_runs == pytest.approx(1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert fit.r2_runs < fit.r2  # the seeds' spread around their mean is not explained
    assert fit.metrics()["law/r2_runs"] == pytest.approx(fit.r2_runs)
    assert f"{fit.r2_runs:.3f} on the runs themselves" in sa.verdict_law(
        "theorem_1_1", {"tau": fit}, df)


def test_without_replicates_the_ci_is_nan_not_zero_width():
    fit = sa.fit_loglinear(law_frame(seeds=(0,)), "train_tokens", "val/tau_chain")
    assert math.isnan(fit.slope_ci[0]) and math.isnan(fit.slope_ci[1])
    assert fit.extrap_within_ci is None
    assert "law/slope_ci_low" not in fit.metrics()  # MLflow gets no NaN


def test_ratio_points_are_sums_not_means_of_ratios():
    # two prompts per x: tau must be sum(new)/sum(forwards), not the mean of per-prompt taus
    df = pd.DataFrame({"x": [1, 1, 10, 10], "prompt": ["a", "b", "a", "b"],
                       "new_tokens": [10, 90, 20, 100], "target_forwards": [10, 10, 10, 10]})
    fit = sa.fit_loglinear(df, "x", "tau", unit="prompt", paired=True,
                           ratio=("new_tokens", "target_forwards"))
    assert list(fit.points["tau"]) == [5.0, 6.0]
    assert fit.slope == pytest.approx(1 / math.log(10))


def test_paired_bootstrap_resamples_shared_units_jointly():
    # every prompt shifts all points alike: paired resampling sees no slope uncertainty
    rows = [{"x": x, "prompt": p, "tau": 1 + 0.3 * math.log(x) + off}
            for p, off in enumerate([0.0, 0.5, 1.0, 1.5]) for x in (1, 4, 16)]
    df = pd.DataFrame(rows)
    paired = sa.fit_loglinear(df, "x", "tau", unit="prompt", paired=True)
    independent = sa.fit_loglinear(df, "x", "tau", unit="prompt")
    assert paired.slope_ci[1] - paired.slope_ci[0] < 1e-9
    assert independent.slope_ci[1] - independent.slope_ci[0] > 0.05


def test_grouped_fits_and_table():
    df = pd.concat([law_frame(slope=0.1).assign(kind="a"), law_frame(slope=0.3).assign(kind="b")])
    fits = sa.fit_loglinear(df, "train_tokens", "val/tau_chain", group="kind", unit="seed")
    assert set(fits) == {"a", "b"}
    assert fits["b"].slope > fits["a"].slope + 0.1
    table = sa.fits_table(fits)
    assert list(table["kind"]) == ["a", "b"]


def test_fit_errors_name_the_problem():
    with pytest.raises(DataError, match="no column 'draft_n_layer'"):
        sa.fit_loglinear(law_frame(), "draft_n_layer", "val/tau_chain")
    with pytest.raises(DataError, match="at least 2 distinct"):
        sa.fit_loglinear(law_frame(xs=(1e4,)), "train_tokens", "val/tau_chain")
    with pytest.raises(DataError, match="must be > 0"):
        sa.fit_loglinear(law_frame(xs=(1, 1e4)).replace({"train_tokens": {1: 0}}),
                         "train_tokens", "val/tau_chain")


# -- runs from MLflow ---------------------------------------------------------------------------

def log_train_runs(df, experiment="exp"):
    for _, r in df.iterrows():
        with tracking.stage_run("train", {"train_tokens": int(r["train_tokens"]),
                                          "seed": int(r["seed"]), "kind": "scylla",
                                          "draft": None}, experiment=experiment):
            mlflow.log_metrics({"val/tau_chain": r["val/tau_chain"]})


def test_load_runs_is_tidy_with_numeric_params(mlflow_store):
    log_train_runs(law_frame(xs=(1e4, 1e5), seeds=(0, 1)))
    with tracking.stage_run("decode", {"method": "tree"}, experiment="exp"):
        mlflow.log_metric("decode/tau", 2.0)
    runs = sa.load_runs("exp", stage="train")
    assert len(runs) == 4 and set(runs["stage"]) == {"train"}
    assert runs["train_tokens"].dtype.kind in "if" and runs["seed"].dtype.kind in "if"
    assert runs["kind"].tolist() == ["scylla"] * 4  # strings stay strings
    assert "val/tau_chain" in runs.columns and "params.seed" not in runs.columns
    assert len(sa.load_runs("exp")) == 5
    trees = sa.load_runs("exp", filter_string="params.method = 'tree'")
    assert trees["method"].tolist() == ["tree"]
    assert sa.load_runs("nope").empty and "run_id" in sa.load_runs("nope").columns


def test_load_runs_skips_unfinished_and_incomplete_attempts(mlflow_store):
    log_train_runs(law_frame(xs=(1e4,), seeds=(0,)))
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("exp").experiment_id
    running = client.create_run(exp, tags={"stage": "train"})
    client.log_metric(running.info.run_id, "val/tau_chain", 9.0)
    # FINISHED, but its attempt was never tagged complete (killed between run and tag)
    with tracking.stage_run("train", {"seed": 5}, experiment="exp",
                            tags={"scylla.attempt": "a1", "scylla.point_key": "p"}):
        mlflow.log_metric("val/tau_chain", 8.0)
    runs = sa.load_runs("exp", stage="train")
    assert runs["val/tau_chain"].max() < 8
    everything = sa.load_runs("exp", finished_only=False)
    assert {"RUNNING", "FINISHED"} <= set(everything["status"])
    inv = sa.inventory(everything)
    assert inv.loc[inv["status"] == "RUNNING", "runs"].sum() == 1


def test_latest_attempt_per_point_wins(mlflow_store):
    for attempt, tau in (("old", 1.5), ("new", 2.5)):
        with tracking.stage_run("train", {"seed": 0}, experiment="exp", tags={
                "scylla.attempt": attempt, "scylla.point_key": "p", "scylla.complete": "1"}):
            mlflow.log_metric("val/tau_chain", tau)
    assert sa.load_runs("exp")["val/tau_chain"].tolist() == [2.5]
    assert len(sa.load_runs("exp", latest_per_point=False)) == 2


# -- tables, figures, verdicts -----------------------------------------------------------------

def bars(ax):
    """{legend label: bar heights in x-tick order} of a seaborn hue barplot."""
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == len(ax.containers)
    return {label: [p.get_height() for p in c] for label, c in zip(labels, ax.containers)}


def ticks(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def check_law_panel(ax, runs, fit, hue=None):
    """``law_panel``'s artists: a dot per run (per ``hue`` value), the law's points, and the
    fitted line, whose slope and intercept in ln(x) are the fit's; axes named by x and y."""
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale()) == (fit.x, fit.y, "log")
    groups = runs.groupby(hue) if hue else [(None, runs)]
    dots = [c for c in ax.collections if isinstance(c, PathCollection)
            and not c.get_label().startswith("largest")]
    assert len(dots) == len(groups)
    for c, (value, part) in zip(dots, groups):
        assert not hue or c.get_label() == f"{hue} {value}"
        assert c.get_offsets().tolist() == part[[fit.x, fit.y]].to_numpy().tolist()
    assert sum(len(c.get_offsets()) for c in dots) == len(runs)
    (means,) = ax.containers
    assert means.lines[0].get_xydata().tolist() == fit.points[[fit.x, fit.y]].to_numpy().tolist()
    (line,) = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    lx, ly = line.get_xdata(), line.get_ydata()
    xs = fit.points[fit.x]
    assert (lx.min(), lx.max()) == pytest.approx((xs.min(), xs.max()))
    slope, intercept = np.polyfit(np.log(lx), ly, 1)
    assert slope == pytest.approx(fit.slope) and intercept == pytest.approx(fit.intercept)
    assert f"R²={fit.r2:.3f}" in line.get_label()


def decode_frame():
    rows = []
    for variant, gain in (("eagle2-style", 0.0), ("eagle3", 0.6), ("scylla", 0.8)):
        for batch in (1, 4):
            rows.append({"variant": variant, "decode_batch_size": batch, "method": "tree",
                         "decode/tau": 2 + gain, "decode/tokens_per_s": (20 + 10 * gain) * batch,
                         "decode/tau/writing": 2 + gain, "decode/tau/coding": 2.2 + gain,
                         "decode/tau/summarization": 2.5 + 2 * gain, "decode/tau/qa": 2.1 + gain})
    return pd.DataFrame(rows)


def test_category_table_groups_mt_bench_and_figure_2_verdict_is_computed():
    runs = decode_frame()[lambda d: d["decode_batch_size"] == 1]
    table = sa.category_table(runs)
    assert set(table.index) == {"mt_bench", "summarization", "qa"}
    assert table.loc["mt_bench", "scylla"] == pytest.approx(2.9)  # mean of writing, coding
    text = sa.verdict_figure_2(runs)
    assert "+0.80" in text and "+0.20" in text and "Largest gain on summarization" in text
    ax = sa.plot_figure_2(runs).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("category", "decode/tau")
    assert bars(ax) == {v: [table.loc[c, v] for c in ticks(ax)] for v in table.columns}
    assert sorted(ticks(ax)) == sorted(table.index)
    assert bars(ax)["scylla"][ticks(ax).index("summarization")] == pytest.approx(4.1)


def test_table_5_ratios_and_verdict_follow_the_numbers():
    table = sa.table_5(decode_frame())
    assert table.loc[1, "scylla ÷ eagle2-style"] == pytest.approx(28 / 20)
    assert "1.40×" in sa.verdict_table_5(table)
    fast = decode_frame()
    fast.loc[fast["variant"] == "scylla", "decode/tokens_per_s"] *= 2
    assert "reach the paper's ~2×" in sa.verdict_table_5(sa.table_5(fast))
    runs = decode_frame()
    ax = sa.plot_table_5(runs).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("decode_batch_size", "decode/tokens_per_s")
    assert ticks(ax) == ["1", "4"]
    # one bar per run (a variant at a batch size), as tall as its throughput
    assert sum(len(h) for h in bars(ax).values()) == len(runs)
    assert bars(ax) == {v: part.sort_values("decode_batch_size")["decode/tokens_per_s"].tolist()
                        for v, part in runs.groupby("variant")}


def test_law_verdict_changes_with_the_data():
    good = sa.fit_loglinear(law_frame(), "train_tokens", "val/tau_chain", unit="seed")
    text = sa.verdict_law("theorem_1_1", {"tau": good}, law_frame())
    assert text.splitlines()[1].startswith("**Supported**")
    assert f"{good.slope:.3f}" in text and f"{good.r2:.3f}" in text
    bad = sa.fit_loglinear(law_frame(slope=-0.2), "train_tokens", "val/tau_chain", unit="seed")
    assert "**Not supported**" in sa.verdict_law("theorem_1_1", {"tau": bad}, law_frame())
    flat = sa.fit_loglinear(law_frame(slope=0.0, noise=0.05, rng_seed=3), "train_tokens",
                            "val/tau_chain", unit="seed")
    text = sa.verdict_law("theorem_1_1", {"tau": flat}, law_frame())
    assert "**Supported**" not in text


def test_a_point_missing_runs_is_called_out():
    runs = law_frame()
    fit = sa.fit_loglinear(runs, "train_tokens", "val/tau_chain", unit="seed")
    assert "Unbalanced" not in sa.verdict_law("theorem_1_1", {"tau": fit}, runs)
    partial = runs[~((runs["train_tokens"] == 1e6) & (runs["seed"] > 0))]
    fit = sa.fit_loglinear(partial, "train_tokens", "val/tau_chain", unit="seed")
    text = sa.verdict_law("theorem_1_1", {"tau": fit}, partial)
    assert "train_tokens = 1,000,000 rest on fewer runs than the others (1 against 3)" in text
    assert text.splitlines()[1].startswith("**Provisionally supported**")


def test_verdicts_name_the_target_and_machine_the_runs_recorded():
    runs = law_frame()
    fit = {"tau": sa.fit_loglinear(runs, "train_tokens", "val/tau_chain", unit="seed")}
    assert "an unrecorded machine" in sa.verdict_law("theorem_1_1", fit, runs)
    runs = runs.assign(target="smollm2", machine="x86_64 2 cores")
    assert "smollm2 measured on x86_64 2 cores" in sa.verdict_law("theorem_1_1", fit, runs)


def batch_frame():
    """Theorem 1.3 runs: batch 1 and 8, trees of 1 and 4 tokens, two timed rounds per cell,
    each tree run beside the plain run of its round."""
    speedups = {(1, 1): [1.2, 1.4], (1, 4): [0.9, 1.1], (8, 1): [0.8, 0.9], (8, 4): [0.5, 0.6]}
    rows = []
    for (batch, width), values in speedups.items():
        for repeat, sp in enumerate(values, start=1):
            cell = {"decode_batch_size": batch, "tree_total_tokens": width, "repeat": repeat}
            rows.append({**cell, "method": "tree", "decode/speedup": sp,
                         "decode/tokens_per_s": 10 * sp, "decode/tau": 1.5})
            rows.append({**cell, "method": "plain", "decode/speedup": 1.0,
                         "decode/tokens_per_s": 10.0, "decode/tau": 1.0})
    return pd.DataFrame(rows)


def test_batch_cells_put_plain_at_width_0_and_give_each_cell_its_interval_over_rounds():
    cells = sa.batch_cells(batch_frame()).set_index(["decode_batch_size", "tree_total_tokens"])
    one = cells.loc[(1, 1)]
    half = 12.7062 * 0.1  # t(0.975, 1) * sd(1.2, 1.4) / sqrt(2)
    assert one["rounds"] == 2 and one["speedup"] == pytest.approx(1.3)
    assert (one["speedup_ci_low"], one["speedup_ci_high"]) == pytest.approx(
        (1.3 - half, 1.3 + half), rel=1e-4)
    plain = cells.loc[(8, 0)]
    assert plain["rounds"] == 4 and plain["speedup"] == 1.0 and plain["tau"] == 1.0
    best = cells[cells["best"]].index.tolist()
    assert best == [(1, 1), (8, 0)]  # no tree beats plain at batch 8


def test_best_width_per_round_is_plain_when_no_tree_wins_and_the_figure_shows_it():
    runs = batch_frame()
    best = sa.best_width_per_round(runs)
    assert best.values.tolist() == [[1, 1, 1, 1.2], [1, 2, 1, 1.4], [8, 1, 0, 1.0],
                                    [8, 2, 0, 1.0]]
    fit = sa.fit_loglinear(best, "decode_batch_size", "best_width", unit="repeat")
    assert fit.slope == pytest.approx(-1 / math.log(8))
    per_width, panel = sa.plot_theorem_1_3(runs, fit).axes
    labels = [t.get_text() for t in per_width.get_legend().get_texts()]
    assert labels == ["plain decoding", "1 tokens", "4 tokens"]
    for bars_of, width in zip(per_width.containers, (1, 4)):
        assert bars_of.lines[0].get_ydata().tolist() == pytest.approx(
            [np.mean(v) for k, v in {(1, 1): [1.2, 1.4], (1, 4): [0.9, 1.1],
                                     (8, 1): [0.8, 0.9], (8, 4): [0.5, 0.6]}.items()
             if k[1] == width])
    check_law_panel(panel, best, fit)
    # no tree beats plain decoding anywhere: the best width is 0 at every batch size, a flat
    # law, which is not the claimed narrowing
    slow = runs.assign(**{"decode/speedup": runs["decode/speedup"].where(
        runs["method"] == "plain", 0.5)})
    flat = sa.fit_loglinear(sa.best_width_per_round(slow), "decode_batch_size", "best_width",
                            unit="repeat")
    text = sa.verdict_law("theorem_1_3", {"width": flat}, slow)
    assert flat.slope == 0 and "**Not supported**" in text and "the law is flat" in text


def test_law_figures_plot_every_run_and_the_fitted_law(tmp_path):
    df = law_frame()
    fit = sa.fit_loglinear(df, "train_tokens", "val/tau_chain", unit="seed")
    (ax,) = sa.plot_theorem_1_1(df, fit).axes
    check_law_panel(ax, df, fit, hue="seed")
    (marker,) = [c for c in ax.collections if c.get_label().startswith("largest")]
    assert marker.get_offsets().tolist() == [[fit.extrap_x, pytest.approx(fit.extrap_predicted)]]
    layers = df.assign(draft_n_layer=df["train_tokens"] / 1e4, draft_params=df["train_tokens"])
    f1 = sa.fit_loglinear(layers, "draft_n_layer", "val/tau_chain")
    f2 = sa.fit_loglinear(layers, "draft_params", "val/tau_chain")
    a, b = sa.plot_theorem_1_2(layers, f1, f2).axes
    check_law_panel(a, layers, f1, hue="seed")
    check_law_panel(b, layers, f2, hue="seed")
    assert ticks(a) == ["1", "3", "10", "30", "100"]  # few small x: ticked at the points
    path = sa.save_points(fit, tmp_path / "points", "t11")
    assert pd.read_csv(path)["n"].tolist() == [3] * 5
    cells = pd.DataFrame({"batch": [1, 2], "speedup": [1.1, 0.9]})
    plain = pd.read_csv(sa.save_points(cells, tmp_path / "points", "cells"))
    assert plain.columns.tolist() == ["batch", "speedup"]  # no row-number column
    named = pd.read_csv(sa.save_points(cells.set_index("batch"), tmp_path / "points", "named"))
    assert named.columns.tolist() == ["batch", "speedup"]  # the named index is kept


def test_loss_note_says_whether_capacity_lowers_the_loss():
    def note(slope):
        runs = law_frame(slope=slope, noise=0.01).rename(columns={"val/tau_chain": "val/loss"})
        return sa.loss_note(sa.fit_loglinear(runs, "train_tokens", "val/loss", unit="seed"))

    assert "lowers the validation loss" in note(-0.05) and "excluding 0" in note(-0.05)
    assert "does not fall firmly" in note(0.05)  # a loss rising with capacity
    one_seed = law_frame(slope=-0.05, seeds=(0,)).rename(columns={"val/tau_chain": "val/loss"})
    text = sa.loss_note(sa.fit_loglinear(one_seed, "train_tokens", "val/loss", unit="seed"))
    assert "no CI" in text and "not judged" in text


def test_chain_steps_decompose_tau_chain_and_the_note_follows_them():
    from scylla.drafts.objective import tau_chain
    from scylla.pipeline.simulate import chain_alphas

    rows = []
    for layers, first in ((1, 0.30), (8, 0.25)):  # deeper: a worse step 1, better later steps
        for seed in (0, 1):
            alphas = [first, 0.1 * layers ** 0.5, 0.2, 0.2]
            counts = list(1000 * np.cumprod(alphas))  # chains alive after each step
            rows.append({"run_id": f"{layers}-{seed}", "draft_n_layer": layers, "seed": seed,
                         "val/tau_chain": tau_chain(counts, 1000),
                         **{f"val/alpha_at_{i}": a for i, a in enumerate(alphas, 1)}})
    runs = pd.DataFrame(rows)
    steps = sa.chain_steps(runs, keep=["draft_n_layer"])
    assert len(steps) == 4 * 4 and steps["step"].max() == 4
    per_run = 1 + steps.groupby("run_id")["reach"].sum()
    assert per_run[runs["run_id"]].to_numpy() == pytest.approx(runs["val/tau_chain"].to_numpy())
    note = sa.chain_steps_note(runs, "draft_n_layer")
    assert "0.300 → 0.250" in note and "draft_n_layer = 1 to 8" in note
    share = 0.275 / steps["reach"].groupby(steps["step"]).mean().sum()
    assert f"Step 1 carries {share:.0%}" in note
    assert len(sa.plot_chain_steps(runs, "draft_n_layer").axes) == 2
    with pytest.raises(ValueError, match="no val/alpha_at_<i> columns"):
        sa.chain_steps(runs[["draft_n_layer", "val/tau_chain"]])
    # the simulated stage's per-step acceptance reproduces its val/tau_chain
    assert 1 + np.cumprod(chain_alphas(1.7)).sum() == pytest.approx(1.7)


# -- the fit stage --------------------------------------------------------------------------------

def test_fit_stage_logs_the_law_and_its_artifacts(mlflow_store, capsys):
    from scylla.commands.cli import main

    log_train_runs(law_frame(seeds=(0, 1)))
    assert main(["fit", "--experiment", "exp", "--stage", "train", "--x", "train_tokens",
                 "--y", "val/tau_chain", "--unit", "seed", "--name", "t11", "--n-boot", "300"]) == 0
    assert "val/tau_chain = " in capsys.readouterr().out
    fits = sa.load_runs("exp", stage="fit")
    assert len(fits) == 1
    row = fits.iloc[0]
    assert row["law/slope"] == pytest.approx(0.2, abs=0.03)
    assert row["law/slope_ci_low"] < row["law/slope"] < row["law/slope_ci_high"]
    assert row["x"] == "train_tokens" and row["n_inputs"] == 10
    art = {a.path for a in mlflow.MlflowClient().list_artifacts(row["run_id"])}
    assert {"points.csv", "runs.csv", "fit.json", "figure.png"} <= art


def test_fit_stage_without_runs_is_a_clear_error(mlflow_store, capsys):
    from scylla.commands.cli import main

    assert main(["fit", "--experiment", "nothing", "--x", "a", "--y", "b", "--no-mlflow"]) == 2
    assert "no finished 'train' runs in experiment 'nothing'" in capsys.readouterr().err


def test_the_roofline_is_flat_until_the_flops_knee():
    roof = sa.A100_8B
    read = 1e3 * 8.0e9 * 2 / 2.039e12  # ms to stream 16 GB of bf16 weights
    assert roof.target_ms(1, 1) == pytest.approx(read)
    assert roof.target_ms(8, 16) == pytest.approx(read)  # 128 tokens: still bandwidth-bound
    assert roof.target_ms(64, 16) == pytest.approx(1e3 * 2 * 8.0e9 * 1024 / 312e12)


def shipped_cells():
    """Tree cells at batch 1 and 4 with their counts, as the shipped sweep logs them."""
    rows = []
    for batch, sp in ((1, 1.2), (4, 0.8)):
        for width, k, tau in ((1, 1, 1.3), (4, 2, 1.6)):
            rows.append({"method": "tree", "decode_batch_size": batch, "tree_total_tokens": width,
                         "tree_top_k": k, "decode/tau": tau, "decode/speedup": sp,
                         "decode/draft_forwards": 200, "decode/target_forwards": 100,
                         "target": "tiny"})
    return pd.DataFrame(rows)


def test_cost_model_predicts_from_the_logged_forward_costs(mlflow_store):
    """Forward costs logged as `scylla bench --forward-cost` logs them (a metric per k), read
    back per batch size and interpolated in k: at batch 1, a 1-token tree's step is a 2-token
    target forward (interpolated between k=1 and k=3) plus 2 draft forwards of 1 token."""
    for batch, base in ((1, 10.0), (4, 20.0)):
        with tracking.stage_run("forward_cost", {"target": "tiny", "decode_batch_size": batch}):
            for k in (1, 3, 5):
                mlflow.log_metric("forward_cost/target_ms", base + k, step=k)
                mlflow.log_metric("forward_cost/draft_ms", 1.0 * k, step=k)
    costs = sa.forward_costs(target="tiny")
    assert costs[costs["decode_batch_size"] == 4]["target_ms"].tolist() == [21, 23, 25]
    cpu, gpu, note = sa.cost_model(shipped_cells())
    one = cpu.set_index(["decode_batch_size", "tree_total_tokens"]).loc[(1, 1)]
    assert one["predicted"] == pytest.approx(1.3 * 11 / (12 + 2 * 1.0))
    wide = cpu.set_index(["decode_batch_size", "tree_total_tokens"]).loc[(4, 4)]
    assert wide["predicted"] == pytest.approx(1.6 * 21 / (25 + 2 * 2.0))
    assert wide["measured"] == 0.8
    assert "measured ÷ predicted speed-up has median" in note and "Simulation" in note
    assert set(gpu["decode_batch_size"]) >= {1, 256}
    fig = sa.plot_cost_model(cpu, gpu)
    assert len(fig.axes) == 3  # the scatter, the simulation and its twin axis


def test_cost_model_names_what_is_missing(mlflow_store):
    cpu, gpu, note = sa.cost_model(shipped_cells().drop(columns="decode/draft_forwards"))
    assert cpu is gpu is None and "lack decode/draft_forwards" in note
    cpu, gpu, note = sa.cost_model(shipped_cells())  # no forward-cost runs in the store
    assert cpu is None and gpu is not None and "No CPU prediction" in note
    best = sa.costmodel.best_predicted(pd.DataFrame(
        {"decode_batch_size": [1, 1, 8], "tree_total_tokens": [1, 4, 1],
         "predicted": [1.1, 1.3, 0.7]}))
    assert best.values.tolist() == [[1, 4, 1.3], [8, 0, 1.0]]


# -- recipe ablations -------------------------------------------------------------------------

def test_recipe_table_joins_each_training_to_its_drafts_decodes(mlflow_store, tmp_path):
    """Three trainings that differ in one setting each (one logged before ``distill_top_k``
    existed), their chain and tree decodes found by draft path; an unrelated decode of another
    draft is left out, and a draft decoded twice shows its newest decode."""
    recipes = [({}, 1.50, 1.40), ({"distill_top_k": 10}, 1.60, 1.55),
               ({"epochs": 2}, 1.70, 1.45)]
    for i, (change, tau_chain, tree_tau) in enumerate(recipes):
        params = {"train_tokens": 300000, "epochs": 1, "ttt_steps": 0, "head": "target",
                  **({"distill_top_k": 0} if i else {}), **change}
        with tracking.stage_run("train", params, experiment="exp"):
            mlflow.set_tag("draft", str(tmp_path / f"d{i}"))
            mlflow.log_metrics({"val/tau_chain": tau_chain, "val/top1_acc": 0.3 + i / 10})
        for method, tau in (("chain", tau_chain - 0.3), ("tree", 0.0), ("tree", tree_tau)):
            with tracking.stage_run("decode", {"method": method, "draft": str(tmp_path / f"d{i}")},
                                    experiment="exp"):
                mlflow.log_metrics({"decode/tau": tau, "decode/tau_ci_low": tau - 0.05,
                                    "decode/tau_ci_high": tau + 0.05,
                                    "decode/alpha_at_0": 0.2 + i / 100})
    with tracking.stage_run("decode", {"method": "tree", "draft": "elsewhere"}, experiment="exp"):
        mlflow.log_metric("decode/tau", 9.0)
    train = sa.load_runs("exp", stage="train", tags={"draft": "draft_dir"})
    table = sa.recipe_table(train, sa.load_runs("exp", stage="decode"))
    # sorted by tree τ; each recipe named by the setting it changes
    assert table["recipe"].tolist() == ["distill_top_k=10", "epochs=2", "base"]
    assert table.attrs["base"] == "epochs=1, distill_top_k=0"
    assert table["tree τ"].tolist() == pytest.approx([1.55, 1.45, 1.40])
    assert table["tree τ low"].tolist() == pytest.approx([1.50, 1.40, 1.35])
    assert table["chain τ"].tolist() == pytest.approx([1.30, 1.40, 1.20])
    assert table["chain first-token acceptance"].tolist() == pytest.approx([0.21, 0.22, 0.20])
    assert table["val/tau_chain"].tolist() == pytest.approx([1.60, 1.70, 1.50])
    assert (table["run minutes"] >= 0).all()
    fig = sa.plot_recipes(table)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == table["recipe"].tolist()
    with pytest.raises(ValueError, match="tags=\\{'draft': 'draft_dir'\\}"):
        sa.recipe_table(sa.load_runs("exp", stage="train"), table)
    assert sa.recipe_table(sa.load_runs("nope"), table).empty
