"""Runs from MLflow as one tidy frame: one row per run, one column per param or metric.

Everything that reads results (fits, plots, notebooks, ``scylla fit``) goes through
``load_runs``, so a param has one spelling everywhere: the column ``train_tokens`` is the
dataclass field, the CLI flag and the MLflow param of that name.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd

from scylla import store
from scylla.store import TAG

# tags that become columns (tag -> column); other tags stay in MLflow
TAG_COLUMNS = {
    "stage": "stage",
    "mlflow.runName": "run_name",
    "machine": "machine",
    TAG + "code_version": "code_version",
    TAG + "point_key": "point_key",
    TAG + "attempt": "attempt",
    TAG + "complete": "complete",
    TAG + "simulated": "simulated",
}
BASE_COLUMNS = ["run_id", "experiment", "status", "start_time", "end_time",
                *TAG_COLUMNS.values()]


def quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _numeric(col: pd.Series) -> pd.Series:
    """A param column as numbers (or booleans) when every non-empty value is one."""
    values = col.replace("", pd.NA).dropna()
    if values.empty:
        return col
    if set(values) <= {"True", "False"}:
        return col.map({"True": True, "False": False})
    converted = pd.to_numeric(values, errors="coerce")
    if converted.isna().any():
        return col
    return pd.to_numeric(col.replace("", pd.NA))


def load_runs(experiment: str | Iterable[str] | None = None, stage: str | None = None,
              filter_string: str | None = None, *, finished_only: bool = True,
              latest_per_point: bool = True, tags: dict[str, str] | None = None
              ) -> pd.DataFrame:
    """Runs of ``experiment`` (a name, names, or None for all) as a tidy frame.

    ``stage`` keeps runs with that ``stage`` tag; ``filter_string`` is an MLflow filter ANDed
    to it (``"params.method = 'tree'"``). Columns: ``BASE_COLUMNS``, then params and metrics
    under their bare names (``train_tokens``, ``val/tau_chain``), numeric params converted.
    With ``finished_only``, only FINISHED runs of complete attempts (see ``scylla.pipeline.reuse``);
    with ``latest_per_point``, one attempt per grid point, the newest, so a point rerun
    after a code change counts once. ``tags`` adds columns of more tags (tag -> column), e.g.
    ``{"draft": "draft_dir"}``: where a train run wrote its draft.
    """
    mlflow = store.mlflow_client_ready()
    if experiment is None:
        exps = mlflow.search_experiments()
    else:
        names = [experiment] if isinstance(experiment, str) else list(experiment)
        exps = [e for e in (mlflow.get_experiment_by_name(n) for n in names) if e is not None]
    clauses = [f"tags.stage = {quote(stage)}"] if stage else []
    if finished_only:
        clauses.append("attributes.status = 'FINISHED'")
    if filter_string:
        clauses.append(filter_string)
    raw = pd.DataFrame()
    if exps:
        raw = mlflow.search_runs(experiment_ids=[e.experiment_id for e in exps],
                                 filter_string=" and ".join(clauses), output_format="pandas")
    if raw.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    names_by_id = {e.experiment_id: e.name for e in exps}
    df = pd.DataFrame({
        "run_id": raw["run_id"],
        "experiment": raw["experiment_id"].map(names_by_id),
        "status": raw["status"], "start_time": raw["start_time"],
        "end_time": raw["end_time"]})
    for tag, column in {**TAG_COLUMNS, **(tags or {})}.items():
        df[column] = raw.get(f"tags.{tag}")
    params = {c.removeprefix("params."): _numeric(raw[c].fillna(""))
              for c in raw.columns if c.startswith("params.")}
    metrics = {c.removeprefix("metrics."): raw[c]
               for c in raw.columns if c.startswith("metrics.")}
    clash = (set(params) & set(metrics)) | ((set(params) | set(metrics)) & set(BASE_COLUMNS))
    if clash:
        # a name logged both as param and metric keeps the metric; the param gets a prefix
        params = {(f"param:{k}" if k in clash else k): v for k, v in params.items()}
        metrics = {(f"metric:{k}" if k in BASE_COLUMNS else k): v for k, v in metrics.items()}
    df = pd.concat([df, pd.DataFrame(params), pd.DataFrame(metrics)], axis=1)
    if finished_only:
        # an attempt that was interrupted before it was tagged complete is not a result
        df = df[df["attempt"].isna() | df["complete"].notna()]
    if latest_per_point:
        df = _latest_attempts(df)
    return df.sort_values("start_time").reset_index(drop=True)


def _latest_attempts(df: pd.DataFrame) -> pd.DataFrame:
    keyed = df[df["point_key"].notna() & df["attempt"].notna()]
    if keyed.empty:
        return df
    started = keyed.groupby("attempt")["start_time"].min()
    newest = (keyed.assign(_started=keyed["attempt"].map(started))
              .sort_values("_started").groupby("point_key")["attempt"].last())
    keep = df["point_key"].isna() | df["attempt"].isna() | df["attempt"].isin(set(newest))
    return df[keep]


def inventory(df: pd.DataFrame, axes: Iterable[str] = ()) -> pd.DataFrame:
    """Run counts per stage and status (and per value of ``axes`` present in ``df``)."""
    if df.empty:
        return pd.DataFrame(columns=["stage", "status", "runs"])
    keys = ["stage", *[a for a in axes if a in df.columns], "status"]
    # runs without a stage tag are `mlflow run` launchers (see pipelines/README.md)
    df = df.assign(stage=df["stage"].fillna("(launcher)"))
    return (df.groupby(keys, dropna=False).size().rename("runs").reset_index()
            .sort_values(keys).reset_index(drop=True))


def per_category(df: pd.DataFrame, metric: str = "decode/tau",
                 keep: Iterable[str] = ()) -> pd.DataFrame:
    """Long frame of a per-category metric (``<metric>/<category>`` columns): one row per
    run and category, with columns ``category``, ``metric``'s name and ``keep``."""
    prefix = metric + "/"
    columns = [c for c in df.columns if c.startswith(prefix) and "/" not in c[len(prefix):]]
    keep = [k for k in ("run_id", *keep) if k in df.columns]
    long = df[keep + columns].melt(id_vars=keep, value_vars=columns, var_name="category",
                                   value_name=metric)
    long["category"] = long["category"].str.removeprefix(prefix)
    return long.dropna(subset=[metric]).reset_index(drop=True)


def chain_steps(df: pd.DataFrame, keep: Iterable[str] = (), prefix: str = "val/alpha_at_"
                ) -> pd.DataFrame:
    """Long frame of a draft's chain acceptance by step (``val/alpha_at_<i>``): one row per
    run and step with ``alpha`` (step i accepted given steps < i were) and ``reach`` (the
    first i steps all accepted, their product). ``val/tau_chain`` is 1 + the sum of ``reach``
    over steps, so ``reach`` shows which step the chain's length comes from."""
    columns = sorted((c for c in df.columns if c.startswith(prefix)),
                     key=lambda c: int(c[len(prefix):]))
    if not columns:
        raise ValueError(f"no {prefix}<i> columns: these runs logged no chain acceptance")
    keep = [k for k in ("run_id", *keep) if k in df.columns]
    alpha = df[columns].set_axis(range(1, len(columns) + 1), axis=1).astype(float)
    wide = pd.concat({"alpha": alpha, "reach": alpha.fillna(0).cumprod(axis=1)}, axis=1)
    long = wide.stack(level=1, future_stack=True).rename_axis([None, "step"]).reset_index("step")
    return df[keep].join(long).reset_index(drop=True)


# Spec-Bench's MT-bench prompts carry their MT-bench subcategory; the benchmark reports them
# as one task, "mt_bench", beside translation, summarization, qa, math_reasoning and rag.
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction",
                       "stem", "humanities")


def category_table(runs: pd.DataFrame, by: str = "variant", metric: str = "decode/tau"
                   ) -> pd.DataFrame:
    """``metric`` per Spec-Bench task (rows) and ``by`` (columns); MT-bench subcategories
    are averaged into ``mt_bench`` (each is a τ over its own prompts)."""
    long = per_category(runs, metric, keep=[by])
    long["category"] = long["category"].where(~long["category"].isin(MT_BENCH_CATEGORIES),
                                              "mt_bench")
    return long.pivot_table(index="category", columns=by, values=metric, aggfunc="mean")


def best_per(df: pd.DataFrame, by: Iterable[str], metric: str) -> pd.DataFrame:
    """For each combination of ``by``, the run with the highest ``metric`` (e.g. the best
    tree width per batch size by tokens/s)."""
    by = list(by)
    rows = df.dropna(subset=[metric])
    return rows.loc[rows.groupby(by, dropna=False)[metric].idxmax()].reset_index(drop=True)
