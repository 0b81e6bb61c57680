"""Write the notebooks of this directory (run: ``python notebooks/make_notebooks.py``).

One notebook per paper artefact, each Claim / Runs / Fit / Figure / Verdict, with thin cells
calling ``scylla.analysis``. The Claim text comes from ``scylla.analysis.claims``; the
verdicts are computed when the notebook runs. The environment picks the store and profile:
``MLFLOW_TRACKING_URI`` (default: the project's ``mlruns/``), ``SCYLLA_PROFILE`` (default
``paper``), ``SCYLLA_SIMULATED=1`` for runs of ``scylla sweep --simulate``, and
``SCYLLA_POINTS_DIR`` for the CSVs of the points behind each figure (default ``points/``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from scylla.analysis.claims import CLAIMS, claim_markdown

HERE = Path(__file__).resolve().parent

SETUP = '''import os
from IPython.display import Markdown, display
from scylla import analysis as sa

PROFILE = os.environ.get("SCYLLA_PROFILE", "paper")
SIMULATED = os.environ.get("SCYLLA_SIMULATED", "0") == "1"
POINTS_DIR = os.environ.get("SCYLLA_POINTS_DIR", "points")
SWEEP = "{sweep}"
EXPERIMENT = sa.experiment_name(SWEEP, PROFILE, SIMULATED)
print(f"MLflow experiment {{EXPERIMENT}}")'''

RUNS_TEXT = ("## Runs\nEvery run of the sweep's MLflow experiment by stage and status. "
             "KILLED or FAILED runs are interrupted attempts; the sweep reran those points, "
             "and only the complete attempt of each point enters the fit.")


def md(text: str) -> dict:
    return new_markdown_cell(text)


def code(text: str) -> dict:
    return new_code_cell(text)


def chain_steps_section(runs: str, x: str) -> list:
    """Where val/tau_chain comes from: the draft's acceptance step by step against ``x``."""
    return [
        md("## Where τ comes from\nval/tau_chain = 1 + Σᵢ P(draft steps 1..i all accepted): "
           "the acceptance at each step of the chain (given the steps before it were "
           "accepted), and the probability of reaching past it, against the sweep's axis."),
        code(f'sa.plot_chain_steps({runs}, "{x}");'),
        code(f'display(Markdown(sa.chain_steps_note({runs}, "{x}")))'),
    ]


def loss_section(runs: str, x: str) -> list:
    """Does the extra capacity learn anything: the draft's validation loss against ``x``."""
    return [
        md("## What capacity does to the loss\nThe draft's validation loss (its cross-entropy "
           "on the target's next tokens) against the same axis. The claim is about τ; the loss "
           "shows whether the extra capacity learns more at this budget even where τ does not "
           "follow yet."),
        code(f'loss = sa.fit_loglinear({runs}, "{x}", "val/loss", unit="seed")\n'
             f'sa.plot_law({runs}, loss, hue="seed");'),
        code("display(Markdown(sa.loss_note(loss)))"),
    ]


def law_notebook(key: str, sweep: str, axes: str, figure: list[str], points: list[str],
                 extra: list | None = None) -> list:
    return [
        md(f"# {CLAIMS[key].title}"), md(claim_markdown(key)),
        code(SETUP.format(sweep=sweep)),
        md(RUNS_TEXT),
        code("all_runs = sa.load_runs(EXPERIMENT, finished_only=False, latest_per_point=False)\n"
             f"sa.inventory(all_runs, axes={axes})"),
        md(f"## Fit\nThe fits declared in `pipelines/sweeps/{sweep}.yaml` (the same ones the "
           "`fit` stage logs): `y = a + b·ln(x)` by least squares on the mean per x, bootstrap "
           "CIs over seeds, and an extrapolation check (fit without the largest x, predict "
           "it)."),
        code("fits = sa.sweep_fits(SWEEP, PROFILE, SIMULATED)\n"
             "sa.fits_table([r.fit for r in fits.values()])"),
        md("## Figure"), code("\n".join(figure)), code("\n".join(points)),
        *(extra or []),
        md("## Verdict\nWritten from the numbers above when the notebook runs."),
        code(f'display(Markdown(sa.verdict_law("{key}", {{n: r.fit for n, r in fits.items()}}, '
             f'all_runs)))'),
    ]


def notebooks() -> dict[str, list]:
    decode_tree = ('runs = sa.load_runs(EXPERIMENT, stage="decode", '
                   'filter_string="params.method = \'tree\'")')
    return {
        "theorem_1_1": law_notebook(
            "theorem_1_1", "theorem_1_1_data", '["train_tokens"]',
            ['main = fits["tau_chain_vs_tokens"]', "sa.plot_theorem_1_1(main.runs, main.fit);"],
            ['sa.save_points(main.fit, POINTS_DIR, "theorem_1_1")'],
            chain_steps_section("main.runs", "train_tokens")),
        "theorem_1_2": law_notebook(
            "theorem_1_2", "theorem_1_2_capacity", '["draft_n_layer"]',
            ['layers, params = fits["tau_chain_vs_layers"], fits["tau_chain_vs_params"]',
             "sa.plot_theorem_1_2(layers.runs, layers.fit, params.fit);"],
            ['sa.save_points(layers.fit, POINTS_DIR, "theorem_1_2_layers")',
             'sa.save_points(params.fit, POINTS_DIR, "theorem_1_2_params")'],
            [*chain_steps_section("layers.runs", "draft_n_layer"),
             *loss_section("layers.runs", "draft_n_layer")]),
        "theorem_1_3": [
            md(f"# {CLAIMS['theorem_1_3'].title}"), md(claim_markdown("theorem_1_3")),
            code(SETUP.format(sweep="theorem_1_3_batch")),
            md(RUNS_TEXT),
            code("all_runs = sa.load_runs(EXPERIMENT, finished_only=False, latest_per_point=False)"
                 '\nsa.inventory(all_runs, axes=["decode_batch_size", "method"])'),
            md("## Cells\nEach (batch size, tree width) cell decodes the same prompts with plain "
               "decoding and with the tree. With `repeats`, the two are timed in interleaved "
               "rounds; a round's speed-up is the tree's tokens/s over plain's in the same "
               "round, and the 95% t-interval is over rounds (NaN with one round). Plain "
               "decoding is width 0, speed-up 1. `best` marks the highest mean speed-up at "
               "each batch size."),
            code('runs = sa.load_runs(EXPERIMENT, stage="decode")\n'
                 "cells = sa.batch_cells(runs)\ncells"),
            md("## Fit\nPer batch size and round: the width with the highest speed-up, or plain "
               "decoding (width 0, speed-up 1) when no tree beats it. That width and that "
               "speed-up are fitted against ln(decode_batch_size), bootstrapped over rounds. "
               "The sweep file's own fits (the `fit` stage) take the best *tree* per round, "
               "never plain decoding; they follow for comparison."),
            code("best = sa.best_width_per_round(runs)\nfits = {\n"
                 '    "best width (plain = 0)": sa.fit_loglinear(\n'
                 '        best, "decode_batch_size", "best_width", unit="repeat"),\n'
                 '    "best speed-up (plain = 1)": sa.fit_loglinear(\n'
                 '        best, "decode_batch_size", "best_speedup", unit="repeat"),\n}\n'
                 "sa.fits_table(list(fits.values()))"),
            code("sweep = sa.sweep_fits(SWEEP, PROFILE, SIMULATED)\n"
                 "sa.fits_table([r.fit for r in sweep.values()])"),
            md("## Figure"),
            code('sa.plot_theorem_1_3(runs, fits["best width (plain = 0)"]);'),
            code('sa.save_points(cells, POINTS_DIR, "theorem_1_3")'),
            md("## Cost model\nA tree's speed-up predicted as τ · c(1) / (c(w + 1) + f · d(k)): "
               "τ and f (draft forwards per step) measured per width at batch 1, c and d the "
               "target's and the draft's forward cost at the cell's batch size, from "
               "`scylla bench --draft default --forward-cost 1,2,3,5,9,17 "
               "--decode-batch-size B` runs (MLflow experiment `scylla`). Then the same model "
               "on a GPU's roofline: a simulation, not a measurement. See "
               "`scylla/analysis/costmodel.py`."),
            code("cpu, gpu, note = sa.cost_model(runs)\ndisplay(Markdown(note))\n"
                 "if gpu is not None:\n    sa.plot_cost_model(cpu, gpu);"),
            md("## Verdict\nWritten from the numbers above when the notebook runs."),
            code('display(Markdown(sa.verdict_law("theorem_1_3", fits, all_runs)))'),
        ],
        "figure_2": [
            md(f"# {CLAIMS['figure_2'].title}"), md(claim_markdown("figure_2")),
            code(SETUP.format(sweep="baselines")),
            md(RUNS_TEXT),
            code("all_runs = sa.load_runs(EXPERIMENT, finished_only=False, latest_per_point=False)"
                 '\nsa.inventory(all_runs, axes=["variant", "method"])'),
            md("## Fit\nτ per Spec-Bench task for each draft, decoded with the same tree at "
               "batch size 1 (T=0: τ does not depend on the batch). MT-bench's subcategories "
               "are averaged into `mt_bench`."),
            code('runs = sa.load_runs(EXPERIMENT, stage="decode", filter_string='
                 '"params.method = \'tree\' and params.decode_batch_size = \'1\'")\n'
                 "table = sa.category_table(runs)\ntable"),
            md("## Figure"), code("sa.plot_figure_2(runs);"),
            code('sa.save_points(table, POINTS_DIR, "figure_2")'),
            md("## Verdict\nWritten from the numbers above when the notebook runs."),
            code("display(Markdown(sa.verdict_figure_2(runs)))"),
        ],
        "table_5": [
            md(f"# {CLAIMS['table_5'].title}"), md(claim_markdown("table_5")),
            code(SETUP.format(sweep="baselines")),
            md(RUNS_TEXT),
            code("all_runs = sa.load_runs(EXPERIMENT, finished_only=False, latest_per_point=False)"
                 '\nsa.inventory(all_runs, axes=["variant", "decode_batch_size"])'),
            md("## Fit\nTokens/s of tree decoding per batch size and draft, and each draft's "
               "throughput divided by the EAGLE-2-style draft's at the same batch size."),
            code(f"{decode_tree}\ntable = sa.table_5(runs)\ntable"),
            md("## Figure"), code("sa.plot_table_5(runs);"),
            code('sa.save_points(table, POINTS_DIR, "table_5")'),
            md("## Verdict\nWritten from the numbers above when the notebook runs."),
            code("display(Markdown(sa.verdict_table_5(table, runs=runs)))"),
        ],
        "overview": [
            md("# Scylla: scaling laws of speculative decoding, reproduced\n"
               "Each law has its own notebook: [Theorem 1.1](theorem_1_1.ipynb) (data), "
               "[Theorem 1.2](theorem_1_2.ipynb) (capacity), [Theorem 1.3](theorem_1_3.ipynb) "
               "(batch), [Figure 2](figure_2.ipynb) (τ per category), [Table 5](table_5.ipynb) "
               "(throughput). This page collects their numbers."),
            code(SETUP.split("SWEEP =")[0]
                 + 'print(f"profile {PROFILE}" + (" (simulated)" if SIMULATED else ""))'),
            md("## Runs\nRuns per sweep, stage and status."),
            code("tables = sa.overview(PROFILE, SIMULATED)\ntables[\"inventory\"]"),
            md("## Laws\nEvery fitted law of every sweep, with its bootstrap CI and "
               "extrapolation check."),
            code('tables["laws"]'),
            md("## τ and speed\nTree decoding per draft and batch size (baselines sweep)."),
            code('tables["speed"]'),
            md("## Draft recipes\nHand-run draft trainings in the `scylla` experiment that "
               "differ only in how they train (issue 21's ablations): each on the target's own "
               "answers, validated on the same target-written text and decoded on the same 40 "
               "Spec-Bench prompts × 128 tokens (`scylla bench "
               "--methods plain,chain,tree`). A recipe is named by its settings that differ "
               "from the most common ones (`base`: none differ). Change `RECIPES` to compare "
               "other runs."),
            code('RECIPES = "params.answers = \'target\'"\n'
                 'train = sa.load_runs("scylla", stage="train", filter_string=RECIPES,\n'
                 '                     tags={"draft": "draft_dir"})\n'
                 'decode = sa.load_runs("scylla", stage="decode", filter_string=(\n'
                 '    "params.prompts = \'spec-bench\' and params.num_prompts = \'40\' "\n'
                 '    "and params.max_new_tokens = \'128\'"))\n'
                 "recipes = sa.recipe_table(train, decode)\n"
                 'print(f"{len(recipes)} recipe runs") if recipes.empty else '
                 "sa.plot_recipes(recipes);"),
            code('print("base:", recipes.attrs.get("base", ""))\nrecipes.round(3)'),
            md("## Headline\nThe summary the README shows (also saved as `headline.md`)."),
            code("display(Markdown(sa.headline_markdown(tables)))\n"
                 "sa.save_headline(tables, POINTS_DIR)"),
        ],
    }


def build(out_dir: Path = HERE) -> list[Path]:
    written = []
    for name, cells in notebooks().items():
        for i, cell in enumerate(cells):
            cell["id"] = f"{name}-{i}"  # stable ids: regenerating changes nothing
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        path = out_dir / f"{name}.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
