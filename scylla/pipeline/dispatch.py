"""``scylla sweep --backend``: run a sweep's stage calls as MLflow project runs on one of
MLflow's execution backends instead of in the sweep's own process.

Each hidden_states / train / decode call becomes ``mlflow.projects.run`` of that stage's
entry point in ``pipelines/MLproject`` (backend ``local``: a subprocess on this machine;
``databricks``, ``kubernetes``: a job on their cluster, described by ``--backend-config``).
Reuse stays the driver's: a call with a complete attempt is not dispatched. The entry point
(``scylla.pipeline.sweep.stage_entry``) rebuilds the same call from its params (params, labels,
upstream run, experiment: the same run key) and runs it through ``scylla.pipeline.reuse.execute``
where it lands, so attempts, owners and kills work as in a sweep run in one process. Once
the project run has ended, the driver reads the call's complete attempt from the tracking
store, which every worker must therefore reach (a tracking server: docs/scale-out.md).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from scylla import store
from scylla.errors import ConfigError
from scylla.experiments import sweeps_dir
from scylla.pipeline.reuse import Outcome, reusable
from scylla.pipeline.stages import StageCall, StageFailedError, normalise

BACKENDS = ("local", "databricks", "kubernetes")


@dataclass(frozen=True)
class Backend:
    name: str  # one of BACKENDS
    config: str | None = None  # JSON file for the backend (cluster spec, Kubernetes job)
    parallel: bool = False  # submit every call of a stage at once, then wait for all

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ConfigError(f"--backend {self.name}: expected one of {', '.join(BACKENDS)}")
        if self.config is None and self.name != "local":
            raise ConfigError(f"--backend {self.name} needs --backend-config FILE.json "
                              "(docs/scale-out.md)")
        if self.config is not None and not (self.config.endswith(".json")
                                            and Path(self.config).is_file()):
            raise ConfigError(f"--backend-config {self.config}: not an existing .json file")


def entry_parameters(call: StageCall) -> dict[str, str]:
    """The entry point's ``-P`` params that rebuild ``call`` there: its params (None as '',
    as MLflow stores it), labels as JSON, the upstream run, whether it is simulated."""
    if call.stage == "fit":
        raise ConfigError("fits read the store and run in the driver, not on a backend")
    params = {k: "" if v is None else str(v) for k, v in call.params.items()}
    params["simulate"] = str(call.simulated).lower()
    if call.labels:
        params["labels"] = json.dumps(call.labels, sort_keys=True)
    if call.upstream is not None:
        params["upstream_run_id"] = call.upstream.info.run_id
    return params


def _submit(call: StageCall, backend: Backend, wait: bool) -> Any:
    """``mlflow.projects.run`` of the call's entry point; returns its SubmittedRun."""
    import mlflow.projects
    from mlflow.exceptions import ExecutionException

    try:
        return mlflow.projects.run(
            str(sweeps_dir().parent), entry_point=call.stage,
            parameters=entry_parameters(call),
            experiment_id=store.experiment_id(call.experiment), backend=backend.name,
            backend_config=backend.config, env_manager="local", synchronous=wait)
    except ExecutionException as e:  # a synchronous run that failed
        raise StageFailedError(f"{call.stage} {normalise(call.params)} failed on backend "
                               f"{backend.name}: {e}") from e


def dispatch(calls: list[StageCall], backend: Backend, takeover: bool = False
             ) -> Iterator[Outcome]:
    """Outcomes of ``calls``, in order: reused attempts, or project runs on ``backend``."""
    found = [reusable(call, takeover) for call in calls]
    started = {i: time.perf_counter() for i, runs in enumerate(found) if runs is None}
    submitted = {}
    try:
        if backend.parallel:
            submitted = {i: _submit(calls[i], backend, wait=False) for i in started}
        for i, (call, runs) in enumerate(zip(calls, found)):
            if runs is not None:
                yield Outcome(runs, True, 0.0)
                continue
            if i not in submitted:
                started[i] = time.perf_counter()
                submitted[i] = _submit(call, backend, wait=True)
            ok = submitted[i].wait()
            runs = reusable(call) if ok else None
            if runs is None:
                raise StageFailedError(
                    f"{call.stage} {normalise(call.params)}: MLflow project run "
                    f"{submitted[i].run_id} on backend {backend.name} "
                    + ("failed" if not ok else "left no complete attempt") + "; see its log")
            yield Outcome(runs, False, time.perf_counter() - started[i])
    except BaseException:  # a failure or a kill of the driver stops what it dispatched
        for run in submitted.values():
            if run.get_status() == "RUNNING":
                run.cancel()
        raise
