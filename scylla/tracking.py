"""MLflow glue: the project's SQLite store, experiments, one run per stage.

Every stage (``hidden_states``, ``train``, ``decode``, ``fit``) logs to one run tagged
``stage=<name>``; params are the config dataclasses' fields, flat, with the same names.
``MLFLOW_TRACKING_URI`` may name a tracking server instead (``http://host:5000``, a
database behind ``mlflow server``; docs/scale-out.md): then the server places artifacts.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from scylla import paths
from scylla.process_owner import OWNER_TAG, owner_alive, owner_id

DEFAULT_EXPERIMENT = "scylla"
# A driver (``scylla sweep``, the pipelines' entry points) hands the stage it launches a
# context: the experiment, tags naming the attempt, labels, and the upstream run's params.
# It travels in the environment so that processes a stage spawns (DDP ranks) inherit it.
CONTEXT_ENV = "SCYLLA_RUN_CONTEXT"
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


def run_context() -> dict[str, Any]:
    """The launching driver's context (see ``CONTEXT_ENV``); empty when run by hand."""
    raw = os.environ.get(CONTEXT_ENV)
    return json.loads(raw) if raw else {}


def lineage_params(upstream: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The upstream run's params, carried so a decode run knows its draft's ``train_tokens``.

    A name the stage logs itself (``seed``) is kept under ``<upstream stage>.<name>``.
    """
    stage = upstream["stage"]
    return {(f"{stage}.{k}" if k in params else k): v for k, v in upstream["params"].items()}


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], experiment: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, with its params logged and ``stage`` tagged.

    The experiment defaults to the driver's (``run_context()``), else ``DEFAULT_EXPERIMENT``.
    A stage run by hand (no driver) tags its owner process and first closes the runs that
    dead processes left RUNNING in that experiment (``close_abandoned``); a driver's context
    carries the owner, and the driver closes its own runs (``scylla.reuse``).
    """
    mlflow = mlflow_client_ready()
    ctx = run_context()
    experiment = experiment or ctx.get("experiment") or DEFAULT_EXPERIMENT
    if ctx.get("upstream"):
        params = {**lineage_params(ctx["upstream"], params), **params}
    params = {**ctx.get("labels", {}), **params}
    exp_id = experiment_id(experiment)
    own_tags = ctx.get("tags")
    if not own_tags:
        close_abandoned(exp_id)
        own_tags = {OWNER_TAG: owner_id()}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags={"stage": stage, **own_tags, **(tags or {})}) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        yield run


def close_abandoned(exp_id: str) -> None:
    """Mark KILLED the runs of experiment ``exp_id`` left RUNNING by an owner process that
    is gone (on this host), naming each on stderr.

    Such a run was cut off by a SIGKILL or a machine going down, so nothing could end it.
    Runs without an owner tag, or owned on another host, are left alone.
    """
    mlflow = mlflow_client_ready()
    client = mlflow.MlflowClient()
    for run in mlflow.search_runs(experiment_ids=[exp_id], output_format="list",
                                  filter_string="attributes.status = 'RUNNING'"):
        owner = run.data.tags.get(OWNER_TAG)
        if not owner or owner_alive(owner) is not False:
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"MLflow run {run.info.run_id} ({run.data.tags.get('stage', '?')}) was left "
              f"RUNNING by process {owner}, which is gone: marked KILLED", file=sys.stderr)
