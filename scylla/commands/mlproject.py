"""The MLproject entry points (``pipelines/*.py``, run by ``mlflow run pipelines -e ...``).

Each stage entry rebuilds the call ``scylla sweep`` would make from its ``-P key=value``
params, so both routes share run keys and reuse each other's runs.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from scylla import store
from scylla.commands import sweep as sweep_command
from scylla.commands.cli import quiet
from scylla.errors import ConfigError
from scylla.experiments import FIT_KEYS, default_profile
from scylla.pipeline.reuse import execute
from scylla.pipeline.stages import StageCall, invoke_stage
from scylla.pipeline.sweep import LAUNCHER_ENV, fit_call
from scylla.store import TAG


def parse_pairs(argv: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs, as ``mlflow run -P key=value`` passes them;
    dashes in keys become underscores (``--train-tokens`` is ``train_tokens``)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected --name value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            i += 1
            value = argv[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _flag_value(value: str) -> Any:
    """A ``-P`` value as a sweep file gives it: ``true``/``false`` are booleans
    (``-P no_progress=true`` is ``--no-progress``), '' is None (no flag)."""
    if value.strip().lower() in ("true", "false"):
        return _true(value)
    return None if value == "" else value


def _enter(project_dir: Path) -> None:
    """Entry points run where `scylla ...` runs: the repository root (relative paths in
    params, the default store and artifacts are the same either way), as quiet as `scylla`."""
    quiet()
    os.environ.setdefault("SCYLLA_PROJECT_DIR", str(project_dir))
    os.chdir(project_dir)


def stage_entry(stage: str, argv: list[str], project_dir: Path) -> int:
    """Entry point of one stage: reuse or run it; ``upstream_run_id`` names the run whose
    output it takes (a hidden_states run for train, a train run for decode), ``labels`` a
    JSON object of labels (a sweep's ``variant``, sent by ``scylla.pipeline.dispatch``).
    Values read as ``_flag_value``, so a call has the run key and flags of the same call
    made by ``scylla sweep``."""
    _enter(project_dir)
    params = parse_pairs(argv)
    simulated = _true(params.pop("simulate", "false"))
    upstream_id = params.pop("upstream_run_id", "")
    labels = json.loads(params.pop("labels", "") or "{}")
    mlflow = store.mlflow_client_ready()
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    experiment = params.pop("log_experiment", "") or store.DEFAULT_EXPERIMENT
    if launcher:  # log beside the launcher, in the experiment `mlflow run` was given
        experiment = mlflow.get_experiment(mlflow.get_run(launcher).info.experiment_id).name
    if stage == "fit":
        source = params.pop("experiment", "")
        unknown = set(params) - set(FIT_KEYS)
        if not source or unknown:
            raise ConfigError(f"fit: needs -P experiment=<experiment of the runs>; unknown "
                              f"params {sorted(unknown)}; allowed: {', '.join(FIT_KEYS)}")
        fit = {**params, "paired": _true(params.get("paired", "false"))}
        call = fit_call(fit, source, experiment, simulated)
    else:
        upstream = mlflow.get_run(upstream_id) if upstream_id else None
        flags = {k: _flag_value(v) for k, v in params.items()}
        call = StageCall(stage, flags, experiment, labels=labels, upstream=upstream,
                         simulated=simulated)
    out = execute(call, invoke_stage, parent_run_id=launcher)
    ids = ",".join(r.info.run_id for r in out.runs)
    print(f"{stage}: {'reused' if out.reused else 'ran'} run(s) {ids}")
    if launcher:  # the launcher is a record of the request, not a stage result
        client = mlflow.MlflowClient()
        client.set_tag(launcher, TAG + "stage_runs", ids)
        client.set_tag(launcher, TAG + "reused", str(int(out.reused)))
    return 0


def sweep_entry(argv: list[str], project_dir: Path) -> int:
    """Entry point ``sweep``: ``--sweep NAME|all --profile P --simulate true|false``."""
    _enter(project_dir)
    params = parse_pairs(argv)
    names = params.get("sweep", "all")
    args = argparse.Namespace(
        sweeps=[] if names == "all" else names.split(","),
        profile=params.get("profile") or default_profile(),
        simulate=_true(params.get("simulate", "false")),
        takeover=_true(params.get("takeover", "false")), backend=None, backend_config=None,
        parallel=False)
    return sweep_command.run(args)
