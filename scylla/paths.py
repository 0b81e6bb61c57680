"""Where data, converted targets and the tracking store live.

- ``SCYLLA_DATA_DIR``: converted targets, tokenized corpora, hidden-state shards.
  Default ``~/.cache/scylla`` (large, never committed).
- ``SCYLLA_PLANS_DIR``: what the tree planner measured on this machine (forward-cost curves,
  drafts' acceptance tables). Default ``<data dir>/plans``.
- ``MLFLOW_TRACKING_URI``: when unset, the project's SQLite store ``mlflow.db`` (artifacts in
  ``artifacts/``) in ``SCYLLA_STORE_DIR``, by default ``mlruns/`` under ``SCYLLA_PROJECT_DIR``
  or the working directory (the committed store; ``scylla main`` points it at ``out/mlruns``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def data_dir() -> Path:
    root = Path(os.environ.get("SCYLLA_DATA_DIR", Path.home() / ".cache" / "scylla"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def plans_dir() -> Path:
    """The planner's measurements (not created here)."""
    if os.environ.get("SCYLLA_PLANS_DIR"):
        return Path(os.environ["SCYLLA_PLANS_DIR"])
    return data_dir() / "plans"


def project_dir() -> Path:
    return Path(os.environ.get("SCYLLA_PROJECT_DIR", Path.cwd())).resolve()


def store_dir() -> Path:
    """The directory of the project's SQLite store (not created here)."""
    if os.environ.get("SCYLLA_STORE_DIR"):
        return Path(os.environ["SCYLLA_STORE_DIR"]).expanduser().resolve()
    return project_dir() / "mlruns"


def mlruns_dir() -> Path:
    root = store_dir()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    return root


def project_store_uri() -> str:
    """The project's SQLite store (not created here: a tracking server may be in use)."""
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    mlruns_dir()  # the store's directory exists before MLflow opens it
    return project_store_uri()


def artifact_root() -> str:
    return (mlruns_dir() / "artifacts").as_uri()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (which the locations above and spawned processes read) for
    the duration of a block, then restore what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
