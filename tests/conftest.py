"""Shared test set-up: every test logs to a throw-away MLflow store, never to mlruns/."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run tiny models, or the 135M target on a few tokens: one torch thread is fastest
    there, and on a shared 2-core machine two threads spend most of a small matmul waiting
    for each other (measured: 20x slower tiny-model tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCYLLA_PROJECT_DIR", str(tmp_path))
    monkeypatch.delenv("SCYLLA_STORE_DIR", raising=False)  # the store then follows the project dir
    # the planner's cost curves and acceptance tables: never carried from one test to another
    monkeypatch.setenv("SCYLLA_PLANS_DIR", str(tmp_path / "plans"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, request):
    """The test's store with MLflow's schema already in place, copied from an empty store
    cached in .pytest_cache: creating one runs MLflow's schema migrations, 10+ s on a busy
    2-core machine, a copy takes milliseconds. Also gives the test its own SCYLLA_DATA_DIR
    and points MLflow's fluent API at the store."""
    import importlib.metadata
    import os
    import shutil
    import subprocess
    import sys

    cache = request.config.cache.mkdir(f"mlflow-store-{importlib.metadata.version('mlflow')}")
    template = cache / "empty.db"
    if not template.exists():
        building = cache / f"building-{os.getpid()}.db"
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri("
                        f"'sqlite:///{building}'); mlflow.search_experiments()"],
                       check=True, capture_output=True)
        os.replace(building, template)  # atomic: concurrent sessions never see half a file
    shutil.copy(template, tmp_path / "mlflow.db")
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(tmp_path / "data"))
    import mlflow

    # the fluent API keeps the URI an earlier test set; point it at this test's store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path / "mlflow.db"
