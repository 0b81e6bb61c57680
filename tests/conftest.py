"""Shared test set-up: every test logs to a throw-away MLflow store, never to mlruns/."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SCYLLA_PROJECT_DIR", str(tmp_path))
