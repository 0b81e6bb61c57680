"""How the sweep driver and the pipelines' entry points call a stage: the one place that
knows which ``scylla`` subcommand implements a stage and which of its flags take the
upstream run's output and this call's output directory.

A stage runs in-process through its CLI module (``add_arguments(parser)``, ``run(args)``),
so the flags a sweep file gives are exactly the subcommand's flags (``train_tokens`` in
YAML is ``--train-tokens``). Stages must open their MLflow run(s) with
``scylla.tracking.stage_run``, which attaches them to the caller's attempt.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scylla.errors import ConfigError, DataError
from scylla.reuse import StageCall, StageFailedError, output_dir


@dataclass(frozen=True)
class Wiring:
    subcommand: str  # row of scylla.cli.SUBCOMMANDS
    input_flag: str | None = None  # receives the upstream run's output
    output_flag: str | None = None  # receives this call's output directory (or a file in it)
    output_file: str | None = None
    output_tag: str | None = None  # tag of this stage's run naming its output for downstream


STAGES = {
    # the shard directory is the stage's own (derived from target, corpus, layers), so every
    # sweep on one target shares and extends it; the run tags it `shards`
    "hidden_states": Wiring("hidden-states", output_tag="shards"),
    "train": Wiring("train", input_flag="shards", output_flag="out", output_tag="draft"),
    "decode": Wiring("bench", input_flag="draft", output_flag="json", output_file="bench.json"),
    "fit": Wiring("fit"),
}


def stage_module_name(stage: str, simulated: bool = False) -> str:
    """The module that runs a stage; a clear error when this checkout does not have it yet."""
    from scylla.cli import SUBCOMMANDS

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if simulated and stage != "fit":
        return "scylla.sweep_simulate"
    sub = STAGES[stage].subcommand
    if sub not in SUBCOMMANDS:
        raise ConfigError(f"stage {stage} runs `scylla {sub}`, which this checkout does not "
                          "have yet; `scylla sweep --simulate` checks the pipeline without it")
    return SUBCOMMANDS[sub][0]


def stage_module(stage: str) -> Any:
    """The CLI module of a stage."""
    return importlib.import_module(stage_module_name(stage))


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
    """Run one stage call in this process (simulated stages: ``scylla.sweep_simulate``)."""
    args = stage_args(call)
    if call.simulated and call.stage != "fit":
        from scylla import sweep_simulate

        sweep_simulate.run_stage(call.stage, args)
        return
    module, parsed = parse_stage_args(call.stage, args)
    status = module.run(parsed)
    if status:
        raise StageFailedError(f"stage {call.stage} exited with status {status}")
