"""``scylla sweep``: run a sweep file's profile, stage by stage, reusing what has run.

Order: hidden_states -> train -> decode (each grid expanded per run of the stage before),
then the fits. Every call goes through ``scylla.reuse.execute``: a call with a complete
attempt for the same params and code is reused, so a sweep killed at any point and started
again runs only what is missing. A kill by SIGTERM/Ctrl-C marks the running attempt KILLED
at once; a SIGKILL leaves it RUNNING until the next start finds its owner gone.
With ``--backend``, the calls run as MLflow project runs elsewhere (``scylla.sweep_dispatch``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from scylla import tracking
from scylla.errors import ConfigError
from scylla.reuse import TAG, Outcome, StageCall, execute, reusable
from scylla.sweep_spec import (FIT_KEYS, STAGE_ORDER, SweepSpec, experiment_name,
                               load_sweep, sweep_paths)
from scylla.sweep_dispatch import BACKENDS, Backend, dispatch
from scylla.sweep_stages import invoke_stage, output_gone, parse_stage_args, stage_args


LAUNCHER_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the entry point's process


@dataclass
class SweepResult:
    sweep: str
    profile: str
    experiment: str
    new: int = 0
    reused: int = 0
    fits: dict[str, Any] = field(default_factory=dict)  # fit name -> law/* metrics


def fit_call(fit: dict[str, Any], source: str, experiment: str, simulated: bool) -> StageCall:
    """A fit of runs in experiment ``source``, logged in ``experiment``; its key includes the
    exact input runs, so a fit is redone when they change."""
    from scylla.analysis.fit_stage import FitSpec, inputs_digest, select_runs

    spec = FitSpec(experiment=source, **fit)
    flags = {"experiment": source, **{k: v for k, v in fit.items() if v}}
    return StageCall("fit", flags, experiment, simulated=simulated,
                     key_extra={"inputs": inputs_digest(select_runs(spec))})


# Stage params naming files the stage reads (paths relative to the repository root, where
# sweeps run); checked with the flags so that a missing file fails the sweep before it runs.
INPUT_FILE_PARAMS = ("prompts",)


def _check_flags(spec: SweepSpec, profile: str) -> None:
    """Parse every stage's flags and find its input files before anything runs: a typo or a
    missing file in the last stage of a long sweep should fail now, not after hours."""
    for plan in spec.profile(profile).stages.values():
        for point in plan.points():
            for key in INPUT_FILE_PARAMS:
                if key in point.params and not Path(point.params[key]).is_file():
                    raise ConfigError(
                        f"{spec.path}: {plan.stage} {key}={point.params[key]}: no such file "
                        f"(relative paths start at the repository root, {Path.cwd()})")
        for point in plan.points()[:1]:
            call = StageCall(plan.stage, point.params, "check")
            parse_stage_args(plan.stage, stage_args(call, create=False))


def run_sweep(spec: SweepSpec, profile: str, *, simulate: bool = False,
              takeover: bool = False, parent_run_id: str | None = None,
              backend: Backend | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run a profile; ``backend``: dispatch hidden_states/train/decode calls as MLflow
    project runs (``scylla.sweep_dispatch``) instead of running them in this process."""
    prof = spec.profile(profile)
    experiment = experiment_name(spec.name, profile, simulate)
    result = SweepResult(spec.name, profile, experiment)
    if not simulate:
        _check_flags(spec, profile)
    upstream: list[Any] = [None]
    made_by: dict[str, StageCall] = {}  # run id -> the call that made (or reused) the run
    remade: dict[str, Any] = {}  # run id -> the run that replaced it (its output was gone)

    def remake(run: Any) -> Any:
        """A new run of the call behind ``run``, whose output is not on this machine."""
        if run.info.run_id not in remade:
            call = made_by[run.info.run_id]
            if call.upstream is not None and output_gone(call.upstream):
                call = replace(call, upstream=remake(call.upstream))
            out = execute(call, invoke_stage, takeover=takeover, parent_run_id=parent_run_id,
                          rerun=True)
            log(f"[{spec.name}/{profile}] {call.stage}: the output of run {run.info.run_id} "
                f"is not on this machine; ran it again in {out.seconds:.1f} s, "
                f"run {out.runs[0].info.run_id}")
            remade[run.info.run_id] = out.runs[0]
        return remade[run.info.run_id]

    def run_local(call: StageCall) -> Outcome:
        # a reused upstream run made elsewhere (a cloned store, a cleared cache) is made again
        # only when a call that is not reused needs its output
        if (call.upstream is not None and output_gone(call.upstream)
                and reusable(call, takeover) is None):
            call = replace(call, upstream=remake(call.upstream))
        out = execute(call, invoke_stage, takeover=takeover, parent_run_id=parent_run_id)
        made_by[out.runs[0].info.run_id] = call
        return out

    for stage in STAGE_ORDER:
        plan = prof.stages.get(stage)
        if plan is None:
            continue
        points = [(point, StageCall(stage, point.params, experiment, labels=point.labels,
                                    upstream=up, simulated=simulate))
                  for up in upstream for point in plan.points()]
        calls = [call for _, call in points]
        if backend is None:
            outcomes: Iterable[Outcome] = (run_local(call) for call in calls)
        else:  # the calls of one stage run on the backend, maybe side by side
            outcomes = dispatch(calls, backend, takeover=takeover)
        produced = []
        for (point, _), out in zip(points, outcomes):
            result.new += not out.reused
            result.reused += out.reused
            log(f"[{spec.name}/{profile}] {stage} {point.describe()}: "
                + ("reused " if out.reused else f"ran in {out.seconds:.1f} s, ")
                + f"run {out.runs[0].info.run_id}")
            produced.append(out.runs[0])
        upstream = produced
    for fit in prof.fits:
        out = execute(fit_call(fit, experiment, experiment, simulate), invoke_stage,
                      takeover=takeover, parent_run_id=parent_run_id)
        result.new += not out.reused
        result.reused += out.reused
        m = result.fits[fit["name"]] = out.runs[0].data.metrics
        nan = float("nan")
        log(f"[{spec.name}/{profile}] fit {fit['name']}: slope {m.get('law/slope', nan):.4f} "
            f"[{m.get('law/slope_ci_low', nan):.4f}, {m.get('law/slope_ci_high', nan):.4f}] "
            f"R² {m.get('law/r2', nan):.4f}" + (" (reused)" if out.reused else ""))
    log(f"[{spec.name}/{profile}] {result.new} run, {result.reused} reused "
        f"-> MLflow experiment {experiment}")
    return result


def run_all(profile: str, *, simulate: bool = False, log: Callable[[str], None] = print
            ) -> list[SweepResult]:
    """Every sweep file's ``profile`` (the main job's reproduction), every file's flags
    checked before the first runs."""
    specs = [load_sweep(p) for p in sweep_paths()]
    if not simulate:
        for spec in specs:
            _check_flags(spec, profile)
    return [run_sweep(spec, profile, simulate=simulate, log=log) for spec in specs]


def reproduce(profile: str, report_dir: str | Path = "notebooks/report",
              simulate: bool = False, log: Callable[[str], None] = print) -> Path:
    """The main job: every sweep's ``profile``, then the notebooks rendered into an HTML
    report (returns its ``index.html``)."""
    from scylla.analysis.report import render_report

    run_all(profile, simulate=simulate, log=log)
    return render_report(report_dir, profile, simulated=simulate, log=log)


def _sigterm_as_exit(signum: int, frame: Any) -> None:
    # SystemExit unwinds through reuse.execute, which marks the running attempt KILLED
    raise SystemExit(128 + signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweeps", nargs="*", help="Sweep names (pipelines/sweeps/<name>.yaml) "
                        "or YAML paths; default: all of them.")
    parser.add_argument("--profile", default=os.environ.get("SCYLLA_PROFILE", "quick"),
                        help="Profile in each file: quick (minutes on a CPU) or paper (hours); "
                             "default $SCYLLA_PROFILE or quick.")
    parser.add_argument("--simulate", action="store_true",
                        help="Replace hidden_states/train/decode with stand-ins (seconds) to "
                             "check files, wiring, reuse, fits and notebooks.")
    parser.add_argument("--takeover", action="store_true",
                        help="Treat unfinished runs owned by another host as dead.")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="Dispatch each hidden_states/train/decode call as an MLflow "
                             "project run of pipelines/MLproject on this MLflow backend "
                             "instead of running it here (fits still run here); see "
                             "docs/scale-out.md.")
    parser.add_argument("--backend-config", default=None,
                        help="JSON file passed to the backend (Databricks: the cluster spec; "
                             "Kubernetes: kube-context, repository-uri, "
                             "kube-job-template-path).")
    parser.add_argument("--parallel", action="store_true",
                        help="With --backend: submit every call of a stage at once and wait "
                             "for all (default: one after the other).")


def run(args: argparse.Namespace) -> int:
    backend = None
    if args.backend:
        backend = Backend(args.backend, args.backend_config, parallel=args.parallel)
    elif args.backend_config or args.parallel:
        raise ConfigError("--backend-config and --parallel need --backend")
    signal.signal(signal.SIGTERM, _sigterm_as_exit)
    paths = args.sweeps or [str(p) for p in sweep_paths()]
    if not paths:
        raise ConfigError("no sweep files found")
    # under `mlflow run -e sweep`, the project's run is the parent of the runs started here
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    for p in paths:
        run_sweep(load_sweep(p), args.profile, simulate=args.simulate, takeover=args.takeover,
                  parent_run_id=launcher, backend=backend)
        sys.stdout.flush()
    return 0


# -- MLproject entry points (pipelines/*.py) ---------------------------------------------------

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
    params, the default store and artifacts are the same either way)."""
    os.environ.setdefault("SCYLLA_PROJECT_DIR", str(project_dir))
    os.chdir(project_dir)


def stage_entry(stage: str, argv: list[str], project_dir: Path) -> int:
    """Entry point of one stage: reuse or run it; ``upstream_run_id`` names the run whose
    output it takes (a hidden_states run for train, a train run for decode), ``labels`` a
    JSON object of labels (a sweep's ``variant``, sent by ``scylla.sweep_dispatch``).
    Values read as ``_flag_value``, so a call has the run key and flags of the same call
    made by ``scylla sweep``."""
    _enter(project_dir)
    params = parse_pairs(argv)
    simulated = _true(params.pop("simulate", "false"))
    upstream_id = params.pop("upstream_run_id", "")
    labels = json.loads(params.pop("labels", "") or "{}")
    mlflow = tracking.mlflow_client_ready()
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    experiment = params.pop("log_experiment", "") or tracking.DEFAULT_EXPERIMENT
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
        profile=params.get("profile", "quick"), simulate=_true(params.get("simulate", "false")),
        takeover=_true(params.get("takeover", "false")), backend=None, backend_config=None,
        parallel=False)
    return run(args)
