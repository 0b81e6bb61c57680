"""The package's floors (pyproject.toml [tool.importlinter]): imports only go downward, the
library floors never reach the tracking store, and no two modules import each other."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(project: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under ``project`` (its pyproject.toml's contracts)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([str(LINT), "--config", str(project / "pyproject.toml"),
                           "--no-cache"], cwd=project, env=env, capture_output=True, text=True)


def test_the_floors_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_an_import_that_climbs_a_floor_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "scylla", tmp_path / "scylla",
                    ignore=shutil.ignore_patterns("__pycache__", "spec_bench"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    corpus = tmp_path / "scylla" / "data" / "corpus.py"
    corpus.write_text(corpus.read_text() + "\nfrom scylla.pipeline import tracking  # noqa\n")
    out = lint(tmp_path)
    assert out.returncode == 1
    assert "Floors import only downward BROKEN" in out.stdout
    assert "scylla.data.corpus -> scylla.pipeline.tracking" in out.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("scylla")
    cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if graph.chain_exists(importer=b, imported=a)]
    assert cycles == []
