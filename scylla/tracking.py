"""MLflow glue: the project's SQLite store, experiments, one run per stage.

Every stage (``hidden_states``, ``train``, ``decode``, ``fit``) logs to one run tagged
``stage=<name>``; params are the config dataclasses' fields, flat, with the same names.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from scylla import paths

DEFAULT_EXPERIMENT = "scylla"


def mlflow_client_ready() -> Any:
    """Point MLflow at the project's store and return the module."""
    import mlflow

    # Alembic/MLflow print their DB migrations at INFO on every first use of a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(paths.tracking_uri())
    return mlflow


def experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    mlflow = mlflow_client_ready()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=paths.artifact_root() + f"/{name}")


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, with its params logged and ``stage`` tagged."""
    mlflow = mlflow_client_ready()
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name,
                          tags={"stage": stage, **(tags or {})}) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        yield run
