"""How the sweep driver and the pipelines' entry points call a stage: the one place that
knows which command module (``scylla.commands.*``, named here, imported by name when a stage
runs) implements a stage, which of its flags take the upstream run's output and this call's
output directory, and where a call's files go.

A stage runs in-process through its CLI module (``add_arguments(parser)``, ``run(args)``),
so the flags a sweep file gives are exactly the subcommand's flags (``train_tokens`` in
YAML is ``--train-tokens``). Stages must open their MLflow run(s) with
``scylla.pipeline.tracking.stage_run``, which attaches them to the caller's attempt.
(This module imports no command: the pipeline floor sits below ``scylla.commands``.)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scylla import paths
from scylla.errors import ConfigError, DataError, ScyllaError
from scylla.pipeline import code_identity, simulate
from scylla.store import TAG


class StageFailedError(ScyllaError):
    """A stage returned an error status or logged no run; its runs are marked FAILED."""


@dataclass(frozen=True)
class Wiring:
    subcommand: str  # `scylla <subcommand>` runs the stage by hand
    module: str  # its command module: add_arguments(parser), run(args)
    input_flag: str | None = None  # receives the upstream run's output
    output_flag: str | None = None  # receives this call's output directory (or a file in it)
    output_file: str | None = None
    output_tag: str | None = None  # tag of this stage's run naming its output for downstream


STAGES = {
    # the shard directory is the stage's own (derived from target, corpus, layers), so every
    # sweep on one target shares and extends it; the run tags it `shards`
    "hidden_states": Wiring("hidden-states", "scylla.commands.hidden_states",
                            output_tag="shards"),
    "train": Wiring("train", "scylla.commands.train", input_flag="shards", output_flag="out",
                    output_tag="draft"),
    "decode": Wiring("bench", "scylla.commands.bench", input_flag="draft", output_flag="json",
                     output_file="bench.json"),
    "fit": Wiring("fit", "scylla.commands.fit"),
}


def stage_module_name(stage: str, simulated: bool = False) -> str:
    """The module that runs a stage (simulated: the stand-ins of ``scylla.pipeline.simulate``)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if simulated and stage != "fit":
        return "scylla.pipeline.simulate"
    return STAGES[stage].module


def code_version(call: "StageCall") -> str:
    """Hash of the source the call's stage runs (``scylla.pipeline.code_identity``)."""
    return code_identity.code_version(stage_module_name(call.stage, call.simulated))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def normalise(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (strings; None as ''), so keys match across routes."""
    return {k: ("" if v is None else str(v)) for k, v in sorted(params.items())}


@dataclass(frozen=True)
class StageCall:
    """One execution request of a stage."""

    stage: str
    params: dict[str, Any]  # passed to the stage (flags) and part of the key
    experiment: str
    labels: dict[str, str] = field(default_factory=dict)  # logged as params, not passed
    upstream: Any = None  # mlflow Run whose output feeds this call, or None
    simulated: bool = False
    # defines the call without being passed to the stage (a fit's exact input runs)
    key_extra: dict[str, str] = field(default_factory=dict)

    @property
    def point_key(self) -> str:
        up = None
        if self.upstream is not None:  # a run made outside any sweep is known by its id
            up = self.upstream.data.tags.get(TAG + "point_key") or self.upstream.info.run_id
        return _digest({"stage": self.stage, "params": normalise(self.params),
                        "labels": normalise(self.labels), "upstream": up,
                        "simulated": self.simulated, "extra": normalise(self.key_extra)})

    @property
    def run_key(self) -> str:
        return _digest({"point": self.point_key, "code": code_version(self)})


def stage_module(stage: str) -> Any:
    """The CLI module of a stage."""
    return importlib.import_module(stage_module_name(stage))


def output_dir(call: StageCall) -> Path:
    """Where a call's files go: the same directory for every attempt of one run key, so a
    restarted stage finds what its killed attempt wrote (complete shards, checkpoints)."""
    experiment = "".join(c if c.isalnum() or c in "._-" else "_" for c in call.experiment)
    return paths.data_dir() / "stages" / experiment / call.stage / call.run_key


def output_gone(run: Any) -> bool:
    """Whether the output ``run``'s stage tagged for downstream stages is missing here (the
    run was made on another machine, or the cache was cleared)."""
    tag = STAGES[run.data.tags["stage"]].output_tag
    return bool(tag) and tag in run.data.tags and not Path(run.data.tags[tag]).exists()


def stage_args(call: StageCall, create: bool = True) -> dict[str, Any]:
    """The call's params plus its input (upstream output) and output paths (``create``:
    make the output directory)."""
    wiring = STAGES[call.stage]
    args = dict(call.params)
    if wiring.input_flag and call.upstream is not None:
        up = call.upstream
        tag = STAGES[up.data.tags["stage"]].output_tag
        if tag not in up.data.tags:
            raise DataError(f"{call.stage}: upstream {up.data.tags['stage']} run "
                            f"{up.info.run_id} has no tag {tag!r} naming its output")
        args.setdefault(wiring.input_flag, up.data.tags[tag])
    if wiring.output_flag:
        out = output_dir(call)
        if create:
            out.mkdir(parents=True, exist_ok=True)
        args.setdefault(wiring.output_flag,
                        str(out / wiring.output_file) if wiring.output_file else str(out))
    return args


def to_argv(params: dict[str, Any]) -> list[str]:
    """``{"train_tokens": 1000, "compile": False}`` -> ``--train-tokens 1000 --no-compile``."""
    argv = []
    for k, v in params.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            argv += [flag, str(v)]
    return argv


class _Parser(argparse.ArgumentParser):
    """Bad flags become a ConfigError (argparse would exit the whole sweep)."""

    def error(self, message: str) -> Any:
        raise ConfigError(f"{self.prog}: {message}")


def parse_stage_args(stage: str, args: dict[str, Any]) -> tuple[Any, argparse.Namespace]:
    """The stage's module and its parsed flags; unknown flags are a ConfigError."""
    module = stage_module(stage)
    parser = _Parser(prog=f"scylla {STAGES[stage].subcommand}")
    module.add_arguments(parser)
    parsed, unknown = parser.parse_known_args(to_argv(args))
    if unknown:
        raise ConfigError(f"stage {stage} (`scylla {STAGES[stage].subcommand}`) has no flags "
                          f"{' '.join(u for u in unknown if u.startswith('--'))}")
    return module, parsed


def invoke_stage(call: StageCall) -> None:
    """Run one stage call in this process (simulated stages: ``scylla.pipeline.simulate``)."""
    module, parsed = parse_stage_args(call.stage, stage_args(call))
    if call.simulated and call.stage != "fit":
        simulate.run_stage(call.stage, vars(parsed))
        return
    status = module.run(parsed)
    if status:
        raise StageFailedError(f"stage {call.stage} exited with status {status}")
