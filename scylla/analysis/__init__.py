"""Analysis: runs from MLflow as tidy frames, log-linear law fits, seaborn figures, verdicts.

    from scylla import analysis as sa
    runs = sa.load_runs("theorem_1_1_data-paper", stage="train")
    fit = sa.fit_loglinear(runs, "train_tokens", "val/tau_chain", unit="seed")
    sa.plot_theorem_1_1(runs, fit)
"""
from scylla.analysis.claims import (
                                    CLAIMS,
                                    chain_steps_note,
                                    claim_markdown,
                                    loss_note,
                                    verdict_figure_2,
                                    verdict_law,
                                    verdict_table_5,
)
from scylla.analysis.costmodel import (
                                    A100_8B,
                                    Roofline,
                                    cost_model,
                                    forward_costs,
                                    plot_cost_model,
)
from scylla.analysis.fit import LawFit, fit_loglinear, fits_table
from scylla.analysis.plots import (
                                    batch_cells,
                                    best_width_per_round,
                                    plot_chain_steps,
                                    plot_figure_2,
                                    plot_law,
                                    plot_table_5,
                                    plot_theorem_1_1,
                                    plot_theorem_1_2,
                                    plot_theorem_1_3,
                                    table_5,
)
from scylla.analysis.recipes import plot_recipes, recipe_table
from scylla.analysis.runs import (
                                    best_per,
                                    category_table,
                                    chain_steps,
                                    inventory,
                                    load_runs,
                                    per_category,
)
from scylla.analysis.sweeps import (
                                    FitResult,
                                    headline_markdown,
                                    overview,
                                    save_headline,
                                    save_points,
                                    speed_table,
                                    sweep_fits,
)
from scylla.experiments import experiment_name

__all__ = [
    "A100_8B", "Roofline", "cost_model", "forward_costs", "plot_cost_model",
    "plot_recipes", "recipe_table",
    "CLAIMS", "batch_cells", "best_per", "best_width_per_round",
    "category_table", "chain_steps", "chain_steps_note",
    "claim_markdown", "experiment_name", "fit_loglinear", "FitResult", "fits_table",
    "headline_markdown", "inventory", "LawFit", "load_runs", "loss_note", "overview",
    "per_category", "plot_chain_steps", "plot_figure_2", "plot_law", "plot_table_5",
    "plot_theorem_1_1", "plot_theorem_1_2", "plot_theorem_1_3", "save_headline", "save_points",
    "speed_table", "sweep_fits", "table_5", "verdict_figure_2", "verdict_law",
    "verdict_table_5",
]
