"""Theorem 1.3's cost model: a tree's speed-up over plain decoding predicted from its
acceptance and the forward-cost curve, set against the measured speed-ups, and the same model
on a GPU-like roofline (a simulation, labelled as one).

    speed-up(b, w) = τ(w) · c_b(1) / (c_b(w + 1) + f(w) · d_b(k))

- τ(w): the mean accepted length of the tree of ``w`` tokens, measured at batch 1 (at T = 0
  acceptance does not depend on the batch size);
- c_b(n): one target forward of n tokens per row at batch b (the tree's w tokens and its root);
- f(w): the tree's draft forwards per target forward, measured; d_b(k): one draft forward of
  k tokens per row, k the tree's top-k (an expansion feeds a frontier's children).

The model has no per-step host work (building the tree, its mask, Python between kernels):
the gap between predicted and measured speed-ups is that work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd

from scylla.analysis.plots import BATCH, WIDTH, axes_figure, log_x
from scylla.analysis.runs import best_per, quote
from scylla.errors import DataError
from scylla.store import DEFAULT_EXPERIMENT


def forward_costs(experiment: str = DEFAULT_EXPERIMENT, target: str | None = None
                  ) -> pd.DataFrame:
    """The latest ``scylla bench --forward-cost`` run per batch size in ``experiment``
    (of ``target``, if given): rows ``BATCH, k, target_ms, draft_ms``."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(f"no MLflow experiment {experiment!r} with forward-cost runs")
    where = "tags.stage = 'forward_cost'"
    if target:
        where += f" and params.target = {quote(target)}"
    runs = client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"])
    rows, seen = [], set()
    for run in runs:
        batch = int(run.data.params.get(BATCH, 1))
        if batch in seen or "forward_cost/draft_ms" not in run.data.metrics:
            continue
        seen.add(batch)
        series = {name: {m.step: m.value for m in client.get_metric_history(
            run.info.run_id, f"forward_cost/{name}")} for name in ("target_ms", "draft_ms")}
        rows += [{BATCH: batch, "k": k, "target_ms": ms, "draft_ms": series["draft_ms"].get(k)}
                 for k, ms in sorted(series["target_ms"].items())]
    if not rows:
        raise DataError(f"no forward-cost runs with a draft in experiment {experiment!r}: run "
                        "`scylla bench --draft default --forward-cost 1,2,3,5,9,17 "
                        "--decode-batch-size B` per batch size")
    return pd.DataFrame(rows)


def _tree_shapes(runs: pd.DataFrame) -> pd.DataFrame:
    """Per tree width, from its batch-1 cells: τ, draft forwards per target forward, top-k."""
    tree = runs[(runs["method"] == "tree") & (runs[BATCH] == runs[BATCH].min())]
    shapes = tree.groupby(WIDTH).agg(
        tau=("decode/tau", "mean"), top_k=("tree_top_k", "first"),
        drafts=("decode/draft_forwards", "sum"), fwds=("decode/target_forwards", "sum"))
    shapes["draft_per_step"] = shapes["drafts"] / shapes["fwds"]
    return shapes[["tau", "top_k", "draft_per_step"]].reset_index()


Cost = Callable[[int, float], float]  # (batch size, tokens per row) -> ms of one forward


def predict(shapes: pd.DataFrame, target_ms: Cost, draft_ms: Cost, batches: list[int]
            ) -> pd.DataFrame:
    """Predicted speed-up per batch size and tree width; ``target_ms(b, n)`` and
    ``draft_ms(b, k)`` give one forward's cost."""
    rows = []
    for b in batches:
        plain = target_ms(b, 1)
        for s in shapes.itertuples():
            step = target_ms(b, getattr(s, WIDTH) + 1) + s.draft_per_step * draft_ms(b, s.top_k)
            rows.append({BATCH: b, WIDTH: getattr(s, WIDTH), "predicted": s.tau * plain / step})
    return pd.DataFrame(rows)


def cpu_prediction(runs: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Every measured tree cell beside the model's prediction from the measured curves
    (interpolated in k at the cell's batch size): ``BATCH, WIDTH, measured, predicted``."""
    def curve(column: str) -> Cost:
        def ms(b: int, n: float) -> float:
            part = costs[costs[BATCH] == b].sort_values("k")
            if part.empty:
                raise DataError(f"no forward-cost run at {BATCH} {b}")
            return float(np.interp(n, part["k"], part[column]))
        return ms

    batches = sorted(set(runs[BATCH].astype(int)) & set(costs[BATCH]))
    pred = predict(_tree_shapes(runs), curve("target_ms"), curve("draft_ms"), batches)
    tree = runs[runs["method"] == "tree"]
    measured = tree.groupby([BATCH, WIDTH])["decode/speedup"].mean().rename("measured")
    return pred.join(measured, on=[BATCH, WIDTH]).dropna()


@dataclass(frozen=True)
class Roofline:
    """A forward's cost as the larger of streaming the weights once and its matmul FLOPs
    (2 per parameter per token), at peak bandwidth and peak FLOP/s; KV-cache reads and
    kernel launches are left out."""

    name: str
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    target_params: float
    draft_params: float
    bytes_per_param: float = 2.0

    def ms(self, params: float, tokens: int) -> float:
        read = params * self.bytes_per_param / self.bandwidth
        return 1e3 * max(read, 2 * params * tokens / self.flops)

    def target_ms(self, batch: int, n: int) -> float:
        return self.ms(self.target_params, batch * n)

    def draft_ms(self, batch: int, k: int) -> float:
        return self.ms(self.draft_params, batch * k)


# NVIDIA's A100 SXM4 80GB datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s dense bf16. An 8B target in
# bf16 (Llama-3-8B-sized, hidden 4,096); its draft one decoder layer of that width (~0.22B) and
# a head over our drafts' 8,192-token vocabulary (~0.03B).
A100_8B = Roofline("A100-80GB, 8B bf16 target", 2.039e12, 312e12, 8.0e9, 0.25e9)


def gpu_simulation(runs: pd.DataFrame, roof: Roofline = A100_8B,
                   batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
                   ) -> pd.DataFrame:
    """The model with our measured τ and draft forwards per width, on ``roof``'s costs."""
    return predict(_tree_shapes(runs), roof.target_ms, roof.draft_ms, list(batches))


def best_predicted(pred: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, the width with the highest predicted speed-up (plain: width 0)."""
    best = best_per(pred, [BATCH], "predicted")
    lose = best["predicted"] <= 1
    best.loc[lose, WIDTH], best.loc[lose, "predicted"] = 0, 1.0
    return best


def cost_model(runs: pd.DataFrame, experiment: str = DEFAULT_EXPERIMENT,
               roof: Roofline = A100_8B
               ) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """(CPU cells measured vs predicted, the GPU simulation, a Markdown note); a part whose
    inputs are missing is None and the note says which input."""
    need = {"decode/draft_forwards", "decode/target_forwards", "decode/tau", "tree_top_k"}
    missing = sorted(need - set(runs.columns))
    if runs.empty or missing:
        return None, None, (f"No cost model: the decode runs lack {', '.join(missing) or 'rows'}"
                            " (simulated stages log no draft forwards).")
    gpu = gpu_simulation(runs, roof)
    best = best_predicted(gpu)
    first, last = best.iloc[0], best.iloc[-1]
    plain_from = best.loc[best[WIDTH] == 0, BATCH]
    sim = (f"**Simulation** ({roof.name}; our draft's τ and draft forwards per width, the GPU's "
           f"roofline costs): the best tree has {int(first[WIDTH])} tokens at batch "
           f"{int(first[BATCH])} (predicted {first['predicted']:.2f}×) and "
           f"{int(last[WIDTH])} at batch {int(last[BATCH])} ({last['predicted']:.2f}×)"
           + (f"; from batch {int(plain_from.iloc[0])} no tree beats plain decoding."
              if len(plain_from) else ".")
           + " On such a GPU a forward of up to ~"
           f"{roof.flops * roof.bytes_per_param / (2 * roof.bandwidth):.0f} tokens costs the "
           "same as one, so the optimum stays wide until batch × tree tokens reaches that knee.")
    target = str(runs["target"].iloc[0]) if "target" in runs.columns else None
    try:
        cpu = cpu_prediction(runs, forward_costs(experiment, target))
    except DataError as e:
        return None, gpu, f"No CPU prediction: {e}\n\n{sim}"
    ratio = cpu["measured"] / cpu["predicted"]
    note = (f"**This CPU**: over {len(cpu)} cells, measured ÷ predicted speed-up has median "
            f"{ratio.median():.2f} (range {ratio.min():.2f}-{ratio.max():.2f}). Below 1, the "
            "step costs more than its forwards (host work the model leaves out).")
    return cpu, gpu, f"{note}\n\n{sim}"


def plot_cost_model(cpu: pd.DataFrame | None, gpu: pd.DataFrame, roof: Roofline = A100_8B
                    ) -> Any:
    """Left: measured against predicted speed-up, one dot per cell (this CPU; left out
    without ``cpu``). Right: the best width and its speed-up per batch size on ``roof``
    (simulation)."""
    import seaborn as sns

    fig, axes = axes_figure(2 if cpu is not None else 1)
    if cpu is not None:
        a = axes[0]
        sns.scatterplot(data=cpu, x="predicted", y="measured", hue=BATCH, style=WIDTH,
                        palette="viridis", ax=a)
        lims = [min(cpu["predicted"].min(), cpu["measured"].min()) * 0.95,
                max(cpu["predicted"].max(), cpu["measured"].max()) * 1.05]
        a.plot(lims, lims, color="black", lw=1, ls="--", label="measured = predicted")
        a.set_title("this CPU: measured vs predicted speed-up", fontsize=10)
        a.legend(fontsize=7, ncol=2)
    b = axes[-1]
    best = best_predicted(gpu)
    b.plot(best[BATCH], best[WIDTH], "o-", color="C0", label="best width (plain = 0)")
    b.set_ylabel("best tree width (tokens)")
    log_x(b, best[BATCH])
    b.set_xlabel(BATCH)
    twin = b.twinx()
    twin.plot(best[BATCH], best["predicted"], "s--", color="C3", label="its speed-up")
    twin.set_ylabel("predicted speed-up over plain")
    b.set_title(f"simulation: {roof.name}", fontsize=10)
    lines = b.get_lines() + twin.get_lines()
    b.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    fig.tight_layout()
    return fig
