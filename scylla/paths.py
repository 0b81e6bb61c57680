"""Where data, converted targets and the tracking store live.

- ``SCYLLA_DATA_DIR``: converted targets, tokenized corpora, hidden-state shards.
  Default ``~/.cache/scylla`` (large, never committed).
- ``MLFLOW_TRACKING_URI``: when unset, the project's SQLite store ``mlruns/mlflow.db``
  (artifacts in ``mlruns/artifacts``) under ``SCYLLA_PROJECT_DIR`` or the working directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    root = Path(os.environ.get("SCYLLA_DATA_DIR", Path.home() / ".cache" / "scylla"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def project_dir() -> Path:
    return Path(os.environ.get("SCYLLA_PROJECT_DIR", Path.cwd())).resolve()


def mlruns_dir() -> Path:
    root = project_dir() / "mlruns"
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    return root


def project_store_uri() -> str:
    """The project's SQLite store (not created here: a tracking server may be in use)."""
    return f"sqlite:///{project_dir() / 'mlruns' / 'mlflow.db'}"


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    mlruns_dir()  # the store's directory exists before MLflow opens it
    return project_store_uri()


def artifact_root() -> str:
    return (mlruns_dir() / "artifacts").as_uri()
