"""The sweep runner: a sweep file's profile, stage by stage, reusing what has run.

Order: hidden_states -> train -> decode (each grid expanded per run of the stage before),
then the fits. Every call goes through ``scylla.pipeline.reuse.execute``: a call with a complete
attempt for the same params and code is reused, so a sweep killed at any point and started
again runs only what is missing. A kill by SIGTERM/Ctrl-C marks the running attempt KILLED
at once; a SIGKILL leaves it RUNNING until the next start finds its owner gone.
With a backend, the calls run as MLflow project runs elsewhere (``scylla.pipeline.dispatch``).
The command line is ``scylla.commands.sweep``; the MLproject entry points are in
``scylla.commands.mlproject``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from scylla.analysis.law import FitSpec, inputs_digest, select_runs
from scylla.analysis.report import render_report
from scylla.data.prompts import prompt_file
from scylla.errors import ConfigError
from scylla.experiments import (
    STAGE_ORDER,
    SweepSpec,
    experiment_name,
    load_sweep,
    sweep_paths,
)
from scylla.pipeline.dispatch import Backend, dispatch
from scylla.pipeline.reuse import Outcome, execute, reusable
from scylla.pipeline.stages import (
    StageCall,
    invoke_stage,
    output_gone,
    parse_stage_args,
    stage_args,
)

LAUNCHER_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the entry point's process


@dataclass
class SweepResult:
    sweep: str
    profile: str
    experiment: str
    new: int = 0
    reused: int = 0
    fits: dict[str, Any] = field(default_factory=dict)  # fit name -> law/* metrics


def fit_call(fit: dict[str, Any], source: str, experiment: str, simulated: bool,
             runs: Any = None) -> StageCall:
    """A fit of runs in experiment ``source``, logged in ``experiment``; its key includes the
    exact input runs (``runs``, when the caller selected them already), so a fit is redone when
    they change."""
    if runs is None:
        runs = select_runs(FitSpec(experiment=source, **fit))
    flags = {"experiment": source, **{k: v for k, v in fit.items() if v}}
    return StageCall("fit", flags, experiment, simulated=simulated,
                     key_extra={"inputs": inputs_digest(runs)})


# Stage params naming files the stage reads (paths relative to the repository root, where
# sweeps run); checked with the flags so that a missing file fails the sweep before it runs.
INPUT_FILE_PARAMS = ("prompts",)


def _check_flags(spec: SweepSpec, profile: str) -> None:
    """Parse every stage's flags and find its input files before anything runs: a typo or a
    missing file in the last stage of a long sweep should fail now, not after hours."""
    for plan in spec.profile(profile).stages.values():
        for point in plan.points():
            for key in INPUT_FILE_PARAMS:
                if key in point.params and not prompt_file(point.params[key]).is_file():
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
    project runs (``scylla.pipeline.dispatch``) instead of running them in this process."""
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
        runs = select_runs(FitSpec(experiment=experiment, **fit))
        if fit["y"] not in runs or not runs[fit["y"]].notna().any():
            # a metric a later command adds to the runs (`scylla validate`): fitted once it has
            log(f"[{spec.name}/{profile}] fit {fit['name']}: not fitted: no {fit['stage']} run "
                f"has {fit['y']} yet")
            continue
        out = execute(fit_call(fit, experiment, experiment, simulate, runs), invoke_stage,
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


def reproduce(profile: str, report_dir: str | Path,
              simulate: bool = False, log: Callable[[str], None] = print) -> Path:
    """The main job: every sweep's ``profile``, then the notebooks rendered into an HTML
    report (returns its ``index.html``)."""
    run_all(profile, simulate=simulate, log=log)
    return render_report(report_dir, profile, simulated=simulate, log=log)
