"""The notebooks: generated from notebooks/make_notebooks.py, and every one of them runs to
the end on the store that the ``quick`` profile of every sweep produces (simulated stages),
rendering the HTML report with verdicts computed from the fitted numbers."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import mlflow
import nbformat
import pandas as pd

from scylla.analysis.report import NOTEBOOKS
from scylla.pipeline.sweep import reproduce

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources(path: Path) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]


def test_committed_notebooks_are_what_the_generator_writes(tmp_path):
    written = generator().build(tmp_path)
    assert sorted(p.stem for p in written) == sorted(NOTEBOOKS)
    for p in written:
        committed = ROOT / "notebooks" / p.name
        assert sources(committed) == sources(p), f"{p.name}: run notebooks/make_notebooks.py"
        kinds = "".join(c.source for c in nbformat.read(p, as_version=4).cells
                        if c.cell_type == "markdown")
        if p.stem != "overview":
            for section in ("## Claim", "## Runs", "## Fit", "## Figure", "## Verdict"):
                assert section in kinds, f"{p.name} lacks {section}"


def test_every_notebook_runs_on_the_quick_profile_store(mlflow_store, tmp_path):
    """The main job (`reproduce`) with simulated stages: every sweep's quick profile, then
    every notebook executed and rendered."""
    index = reproduce("quick", tmp_path / "report", simulate=True, log=lambda s: None)
    assert {e.name for e in mlflow.search_experiments()} >= {
        f"{s}-quick-simulated" for s in ("theorem_1_1_data", "theorem_1_2_capacity",
                                         "theorem_1_3_batch", "baselines")}
    report = index.parent
    # the page template embeds one PNG of its own; a figure adds one
    images = (report / "overview.html").read_text().count("data:image/png")
    for name in NOTEBOOKS:
        page = (report / f"{name}.html").read_text()
        assert "Traceback" not in page  # (a failing cell raises before this anyway)
        if name != "overview":
            assert "are simulated" in page  # the verdicts say what the numbers are
            # theorem_1_1: the law and where τ comes from; theorem_1_2: also its loss
            figures = {"theorem_1_1": 2, "theorem_1_2": 3}.get(name, 1)
            assert page.count("data:image/png") == images + figures, f"{name}: figures"
    # the verdict is written from the numbers the fit stage logged for the same runs
    fit = mlflow.search_runs(experiment_names=["theorem_1_1_data-quick-simulated"],
                             filter_string="tags.stage = 'fit'", output_format="list")[0]
    slope = fit.data.metrics["law/slope"]
    page = (report / "theorem_1_1.html").read_text()
    assert f"{slope:.3f}" in re.sub(r"<[^>]+>", "", page)
    points = pd.read_csv(report / "points" / "theorem_1_1.csv")
    assert len(points) == 6 and {"train_tokens", "val/tau_chain", "y_low", "y_high"} <= set(
        points.columns)
    assert {p.stem for p in (report / "points").glob("*.csv")} >= {
        "theorem_1_1", "theorem_1_2_layers", "theorem_1_2_params", "theorem_1_3", "figure_2",
        "table_5"}
    headline = (report / "points" / "headline.md").read_text()
    assert "val/tau_chain ~ ln(train_tokens)" in headline and "| scylla |" in headline


VERDICT_WORDS = ("Supported", "Provisionally supported", "Partly supported", "Not supported")


def rendered_verdict(profile: str, claim_key: str) -> str:
    """The verdict word of a committed rendered notebook (profile ``paper`` at the top of
    notebooks/report/, other profiles in their own folder)."""
    folder = ROOT / "notebooks" / "report" / ("" if profile == "paper" else profile)
    text = re.sub(r"<[^>]+>", "", (folder / f"{claim_key}.html").read_text())
    words = re.findall(r"Verdict: [^\n]*?(" + "|".join(VERDICT_WORDS) + r"): ", text)
    assert words, f"{folder / claim_key}.html has no verdict"
    return words[0]


def test_the_readme_quotes_the_verdicts_its_notebooks_compute():
    """Every verdict word in the README's results table (the last column, and any
    "`profile`: Verdict" in the row) is the one the rendered notebook of that profile shows."""
    from scylla.analysis.claims import CLAIMS

    keys = {c.title: key for key, c in CLAIMS.items()}
    readme = (ROOT / "README.md").read_text()
    checked = 0
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] not in keys:
            continue
        key, profile = keys[cells[0]], cells[3].strip("`")
        quoted = [(profile, cells[4])] + re.findall(
            r"`(\w+)`: (" + "|".join(VERDICT_WORDS) + ")", cells[2])
        for prof, word in quoted:
            if word in VERDICT_WORDS:
                assert rendered_verdict(prof, key) == word, f"README {cells[0]} ({prof})"
                checked += 1
    assert checked >= 4
