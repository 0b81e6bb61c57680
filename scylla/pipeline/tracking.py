"""Stage runs: one MLflow run per stage call, in the driver's attempt or owned by hand.

Every stage (``hidden_states``, ``train``, ``decode``, ``fit``) logs to one run tagged
``stage=<name>``; params are the config dataclasses' fields, flat, with the same names.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

from scylla.pipeline.owner import OWNER_TAG, owner_alive, owner_id
from scylla.store import DEFAULT_EXPERIMENT, experiment_id, mlflow_client_ready

# A driver (``scylla sweep``, the pipelines' entry points) hands the stage it launches a
# context: the experiment, tags naming the attempt, labels, and the upstream run's params.
# It travels in the environment so that processes a stage spawns (DDP ranks) inherit it.
CONTEXT_ENV = "SCYLLA_RUN_CONTEXT"


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
    carries the owner, and the driver closes its own runs (``scylla.pipeline.reuse``).
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
