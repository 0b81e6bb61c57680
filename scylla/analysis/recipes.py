"""Recipe ablations: draft trainings that differ in how they train, each with its decodes.

A row per ``train`` run: the recipe (the training settings that differ between the runs
compared, every other setting being shared), its cost (minutes of the whole ``scylla train``
command, training tokens/s), its validation on the text it was validated on, and the Spec-Bench
decodes of the draft it wrote (``decode`` runs whose ``draft`` param is the train run's
``draft`` tag): chain τ and first-token acceptance, tree τ, each with the 95% bootstrap CI over
prompts the bench logs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from scylla.config import DraftConfig, TrainConfig

# the training settings a recipe is told apart by; a run logged before a setting existed
# trained with its default (filled from the config classes)
RECIPE_PARAMS = ("kind", "draft_n_layer", "head", "init_from", "epochs", "ttt_steps",
                 "ttt_decay", "feature_noise", "distill_top_k", "w_hidden", "w_logits", "lr",
                 "train_batch_size", "answers", "corpus", "train_tokens", "draft_vocab_size")
DEFAULTS = {f.name: f.default for cls in (DraftConfig, TrainConfig)
            for f in dataclasses.fields(cls) if f.name in RECIPE_PARAMS}
# the bench's decode metrics per method: (column, metric)
DECODED = {"chain": (("chain τ", "decode/tau"), ("chain first-token acceptance",
                                                 "decode/alpha_at_0")),
           "tree": (("tree τ", "decode/tau"),)}


def _recipe_settings(train: pd.DataFrame) -> pd.DataFrame:
    settings = pd.DataFrame(index=train.index)
    for name in RECIPE_PARAMS:
        default = DEFAULTS.get(name, "")
        col = train[name] if name in train.columns else pd.Series(np.nan, index=train.index)
        settings[name] = col.where(col.notna() & (col.astype(str) != ""), default)
    return settings


def _labels(settings: pd.DataFrame) -> tuple[pd.Series, str]:
    """Each run's recipe, ``name=value`` of its settings (``_recipe_settings``) that differ from
    the most common value among the runs (``base`` for a run with every common value), and the
    base's settings."""
    settings = settings.map(_short)
    varying = [c for c in settings.columns if settings[c].nunique() > 1]
    common = {c: settings[c].mode().iloc[0] for c in varying}
    labels = settings[varying].apply(
        lambda row: ", ".join(f"{k}={v}" for k, v in row.items() if v != common[k]) or "base",
        axis=1) if varying else pd.Series("base", index=settings.index)
    return labels, ", ".join(f"{k}={v}" for k, v in common.items())


def _newest(decode: pd.DataFrame, method: str) -> pd.DataFrame:
    """The newest ``method`` decode run of each draft, indexed by the ``draft`` param."""
    if decode.empty or "method" not in decode:
        return pd.DataFrame()
    runs = decode[decode["method"] == method]
    return runs.sort_values("start_time").groupby("draft").last()


def _short(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a param column with gaps (runs before it existed) is float
    text = str(value)
    if "/" in text:  # a draft path (init_from): its last part names it
        text = ".../" + text.rstrip("/").rsplit("/", 1)[-1]
    return text or "''"


def recipe_table(train: pd.DataFrame, decode: pd.DataFrame) -> pd.DataFrame:
    """One row per train run in ``train`` (``load_runs(..., stage="train",
    tags={"draft": "draft_dir"})``) with its decodes from ``decode`` (``stage="decode"``
    runs; the newest per draft and method), sorted by tree τ, then val/tau_chain.
    ``table.attrs["base"]`` lists the settings of the recipe called ``base``."""
    if train.empty:
        return pd.DataFrame(columns=["recipe", "run minutes", "val/tau_chain"])
    if "draft_dir" not in train.columns:
        raise ValueError("train runs need their draft tag: load_runs(..., "
                         "tags={'draft': 'draft_dir'})")
    settings = _recipe_settings(train)
    labels, base = _labels(settings)
    rows = pd.DataFrame({
        "recipe": labels,
        "train tokens": train.get("train_tokens"),
        "epochs": settings["epochs"],
        # the train run's own span: training and validation, not loading the target
        "run minutes": (train["end_time"] - train["start_time"]).dt.total_seconds() / 60,
        "train tokens/s": train.get("train/tokens_per_s"),
        "val top-1": train.get("val/top1_acc"),
        "val/tau_chain": train.get("val/tau_chain"),
    })
    for method, columns in DECODED.items():
        runs = _newest(decode, method)
        for column, metric in columns:
            for suffix, part in (("", ""), (" low", "_ci_low"), (" high", "_ci_high")):
                values = runs.get(metric + part)
                rows[column + suffix] = (np.nan if values is None
                                         else train["draft_dir"].map(values))
    table = rows.sort_values(["tree τ", "val/tau_chain"], ascending=False,
                             na_position="last").reset_index(drop=True)
    table.attrs["base"] = base  # the common settings that "base" stands for
    return table


def plot_recipes(table: pd.DataFrame) -> Any:
    """val/tau_chain per recipe (left) and Spec-Bench chain and tree τ with their CIs over
    prompts (right)."""
    from scylla.analysis.plots import axes_figure

    fig, (left, right) = axes_figure(2, width=5)
    labels = table["recipe"].tolist()
    y = np.arange(len(labels))
    left.barh(y, table["val/tau_chain"] - 1, left=1, color="tab:blue")
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.set_xlabel("val/tau_chain")
    for offset, (name, colour) in zip((-0.15, 0.15), (("chain τ", "tab:orange"),
                                                       ("tree τ", "tab:green"))):
        mid = table[name].astype(float)
        err = np.vstack([mid - table[name + " low"], table[name + " high"] - mid])
        right.errorbar(mid, y + offset, xerr=np.nan_to_num(err), fmt="o", color=colour,
                       label=name, capsize=3)
    right.set_yticks(y, [""] * len(labels))
    right.invert_yaxis()
    right.set_xlabel("Spec-Bench τ, 95% CI over prompts")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
