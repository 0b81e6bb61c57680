"""The MLflow tracking store the project reads and writes: where it is, and a client on it.

The project's store is the SQLite file ``mlruns/mlflow.db`` (artifacts in ``mlruns/artifacts``)
of the checkout, or of ``SCYLLA_PROJECT_DIR``; ``MLFLOW_TRACKING_URI`` may name another one, e.g.
a tracking server (``http://host:5000``; docs/scale-out.md), which then places artifacts.
Every run the project makes carries tags under ``TAG`` (``scylla.*``) and a ``stage`` tag.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scylla import paths

TAG = "scylla."  # prefix of every tag the project's runs carry besides ``stage``
DEFAULT_EXPERIMENT = "scylla"
# Tracking URIs answered by a server, which decides where a new experiment's artifacts go
# (its --default-artifact-root or proxied mlflow-artifacts:/); a store the client opens
# itself (SQLite, a database URI, a directory) gets the project's mlruns/artifacts.
SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc")


def mlflow_client_ready() -> Any:
    """Point MLflow at the project's store and return the module."""
    import mlflow

    # Alembic/MLflow print their DB migrations at INFO on every first use of a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = paths.tracking_uri()
    if uri == paths.project_store_uri():
        relocate_project_store(str(paths.mlruns_dir()))
    mlflow.set_tracking_uri(uri)
    return mlflow


@functools.cache
def relocate_project_store(mlruns: str) -> None:
    """Point the artifact locations in the project store ``<mlruns>/mlflow.db`` at ``mlruns``.

    MLflow records every experiment's and run's artifact location as an absolute path, so a
    store committed in one checkout and cloned to another would keep writing and showing
    artifacts in the first one. MLflow has no API to move them: this rewrites the old
    checkout's ``.../mlruns`` prefix in the store's two location columns (once per process).
    """
    db = Path(mlruns) / "mlflow.db"
    if not db.is_file():
        return
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        old = {m.group(1) for loc in locations if loc
               for m in [re.match(r"(?:file://)?(/.*?/mlruns)/", loc)] if m} - {mlruns}
        for prefix in old:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                            (prefix + "/", mlruns + "/"))


def experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    mlflow = mlflow_client_ready()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    served = urlparse(paths.tracking_uri()).scheme in SERVER_SCHEMES
    location = None if served else paths.artifact_root() + f"/{name}"
    return mlflow.create_experiment(name, artifact_location=location)
