"""Run reuse: a stage already run with the same params and code is not run again.

A *call* (stage + params + upstream run + labels) has a ``point_key`` (what was asked) and a
``run_key`` (what was asked, by which code: the hash of the ``scylla`` source the stage runs,
``scylla.pipeline.code_identity``). Each execution of a call is an *attempt*: the runs the stage
logs while it executes carry the attempt's tags (``scylla.attempt``, ``scylla.run_key``,
``scylla.owner``...), passed to ``scylla.pipeline.tracking.stage_run`` through the run context. Once
the stage has returned, every run of the attempt is tagged ``scylla.complete=<number of
runs>``; only such an attempt is reused.

A sweep killed at any moment therefore leaves either a complete attempt (reused on restart)
or an incomplete one whose owner process is gone: its runs are marked KILLED (with
``scylla.incomplete``) and the call runs again. So every grid point ends with exactly one
complete set of FINISHED runs, and nothing half-logged is ever read as a result.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from scylla import paths, store
from scylla.errors import ScyllaError
from scylla.pipeline import machine, tracking
from scylla.pipeline.owner import OWNER_TAG, owner_alive, owner_id
from scylla.pipeline.stages import StageCall, StageFailedError, code_version, normalise
from scylla.store import TAG


class StageBusyError(ScyllaError):
    """Another live process is running the same call right now."""


# -- attempts ---------------------------------------------------------------------------------

@dataclass
class Attempt:
    attempt_id: str
    runs: list[Any]  # mlflow Run objects

    @property
    def complete(self) -> bool:
        n = str(len(self.runs))
        return all(r.info.status == "FINISHED" and r.data.tags.get(TAG + "complete") == n
                   for r in self.runs)

    @property
    def owner(self) -> str:
        return self.runs[0].data.tags.get(OWNER_TAG, "")

    @property
    def started(self) -> int:
        return min(r.info.start_time for r in self.runs)


def find_attempts(experiment: str, run_key: str) -> list[Attempt]:
    """Attempts of a call in an experiment, oldest first."""
    mlflow = store.mlflow_client_ready()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                              filter_string=f"tags.`{TAG}run_key` = '{run_key}'")
    by_attempt: dict[str, list[Any]] = {}
    for r in runs:
        by_attempt.setdefault(r.data.tags.get(TAG + "attempt", r.info.run_id), []).append(r)
    return sorted((Attempt(a, rs) for a, rs in by_attempt.items()), key=lambda a: a.started)


def mark_incomplete(attempt: Attempt, status: str) -> None:
    """Set an attempt's runs to ``status`` (KILLED/FAILED), keeping the status they had in
    the tag ``scylla.incomplete`` (a FINISHED run may still be claimed, see ``execute``)."""
    client = store.mlflow_client_ready().MlflowClient()
    for r in attempt.runs:
        client.set_tag(r.info.run_id, TAG + "incomplete", r.info.status)
        if r.info.status != status:
            client.set_terminated(r.info.run_id, status)


def reusable(call: StageCall, takeover: bool = False) -> list[Any] | None:
    """The runs of the newest complete attempt of ``call``, after closing dead attempts.

    An incomplete attempt whose owner process is gone is marked KILLED. One whose owner is
    alive (or on another host, unless ``takeover``) raises ``StageBusyError``.
    """
    attempts = find_attempts(call.experiment, call.run_key)
    complete = [a for a in attempts if a.complete]
    for a in attempts:
        if a.complete or all(r.data.tags.get(TAG + "incomplete") for r in a.runs):
            continue
        alive = owner_alive(a.owner) if a.owner else False
        if a.owner == owner_id():
            alive = False  # an earlier attempt of this very process that raised
        if alive or (alive is None and not takeover):
            raise StageBusyError(
                f"{call.stage} {normalise(call.params)} is being run by process {a.owner} "
                f"(MLflow run {a.runs[0].info.run_id}); wait for it, or if it is gone "
                f"(another host), rerun with --takeover")
        mark_incomplete(a, "KILLED")
    return complete[-1].runs if complete else None


def context(call: StageCall, attempt_id: str, parent_run_id: str | None = None
            ) -> dict[str, Any]:
    tags = {TAG + "attempt": attempt_id, TAG + "run_key": call.run_key,
            TAG + "point_key": call.point_key, TAG + "code_version": code_version(call),
            OWNER_TAG: owner_id(), TAG + "simulated": str(int(call.simulated)),
            "machine": machine.description()}  # a stage's own tags may refine it
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    ctx: dict[str, Any] = {"experiment": call.experiment, "tags": tags,
                           "labels": dict(call.labels)}
    if call.upstream is not None:
        ctx["upstream"] = {"stage": call.upstream.data.tags["stage"],
                           "params": dict(call.upstream.data.params)}
    return ctx


@dataclass
class Outcome:
    runs: list[Any]
    reused: bool
    seconds: float


def execute(call: StageCall, invoke: Callable[[StageCall], None], takeover: bool = False,
            parent_run_id: str | None = None, rerun: bool = False) -> Outcome:
    """Reuse ``call``'s complete attempt, or run ``invoke(call)`` as a new attempt (``rerun``:
    even when a complete one exists, e.g. its output is not on this machine).

    ``invoke`` runs the stage in this process; every run it opens through
    ``tracking.stage_run`` joins the attempt. Any exception (a kill by SIGTERM arrives as
    ``SystemExit``) marks the attempt's runs FAILED/KILLED before it propagates.
    """
    start = time.perf_counter()
    runs = reusable(call, takeover)
    if runs is not None and not rerun:
        return Outcome(runs, True, time.perf_counter() - start)
    attempt_id = uuid.uuid4().hex[:12]
    started_ms = int(time.time() * 1000)
    mlflow = store.mlflow_client_ready()
    try:
        with paths.environment({tracking.CONTEXT_ENV:
                                json.dumps(context(call, attempt_id, parent_run_id))}):
            invoke(call)
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        while mlflow.active_run() is not None:  # a run the stage left open
            mlflow.end_run(status)
        mark_incomplete(Attempt(attempt_id, _runs_of(call, attempt_id)), status)
        raise
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")  # reported below as left open
    attempt = Attempt(attempt_id, _claim(call, attempt_id, started_ms))
    if not attempt.runs:
        raise StageFailedError(f"stage {call.stage} returned without logging an MLflow run; "
                               "a stage must open its run with scylla.pipeline.tracking.stage_run")
    still_open = [r for r in attempt.runs if r.info.status != "FINISHED"]
    if still_open:
        mark_incomplete(attempt, "FAILED")
        raise StageFailedError(f"stage {call.stage} returned but left run "
                               f"{still_open[0].info.run_id} open or failed")
    client = mlflow.MlflowClient()
    for r in attempt.runs:
        client.set_tag(r.info.run_id, TAG + "complete", str(len(attempt.runs)))
    # the runs as the claim left them (without the `complete` tag just set)
    return Outcome(attempt.runs, False, time.perf_counter() - start)


def _runs_of(call: StageCall, attempt_id: str) -> list[Any]:
    return next((a.runs for a in find_attempts(call.experiment, call.run_key)
                 if a.attempt_id == attempt_id), [])


def _claim(call: StageCall, attempt_id: str, started_ms: int) -> list[Any]:
    """The runs this attempt produced. Besides its own runs, a stage may have
    - resumed a run of a killed attempt (``scylla train`` continues its MLflow run from a
      checkpoint): that run has ended since this attempt started;
    - found its work already done and logged nothing (``scylla train`` with a finished
      ``result.json``): then the newest earlier attempt whose runs had all FINISHED when it
      was marked incomplete holds the result.
    Claimed runs are re-tagged as this attempt's and FINISHED."""
    attempts = find_attempts(call.experiment, call.run_key)
    runs = [r for a in attempts for r in a.runs
            if a.attempt_id == attempt_id or (r.info.status == "FINISHED"
                                              and (r.info.end_time or 0) >= started_ms)]
    if not runs:
        done = [a for a in attempts if a.attempt_id != attempt_id
                and all(r.data.tags.get(TAG + "incomplete") == "FINISHED" for r in a.runs)]
        runs = done[-1].runs if done else []
    client = store.mlflow_client_ready().MlflowClient()
    claimed = [r for r in runs if r.data.tags.get(TAG + "attempt") != attempt_id]
    for r in claimed:
        client.set_tag(r.info.run_id, TAG + "attempt", attempt_id)
        client.set_tag(r.info.run_id, OWNER_TAG, owner_id())
        if TAG + "incomplete" in r.data.tags:
            client.delete_tag(r.info.run_id, TAG + "incomplete")
        if r.info.status != "FINISHED":
            client.set_terminated(r.info.run_id, "FINISHED")
    return _runs_of(call, attempt_id) if claimed else runs
