"""The ``scylla`` console entry point.

Each subcommand is a module of ``scylla.commands`` exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``scylla
--help`` stays fast. Flags are generated from the config
dataclasses, so a field, its flag and its MLflow param share one name.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import typing
import warnings
from typing import Any

from scylla.errors import ScyllaError
from scylla.experiments import DEFAULT_PROFILE, PROFILE_ENV, default_profile
from scylla.pipeline.tracking import run_context

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "targets": ("scylla.commands.targets", "List the target registry and what is cached."),
    "bench": ("scylla.commands.bench", "Run decoding methods side by side on the same prompts."),
    "generate": ("scylla.commands.generate",
                 "Answer a prompt or a chat with a target and a draft, streaming the text."),
    "main": ("scylla.commands.main", "The default end-to-end job (the README's first command)."),
    "fit": ("scylla.commands.fit", "Fit a log-linear law to runs in MLflow and log it."),
    "sweep": ("scylla.commands.sweep",
              "Run sweep files (pipelines/sweeps) stage by stage, reusing runs."),
    "report": ("scylla.commands.report", "Execute the notebooks and render them to HTML."),
    "hidden-states": ("scylla.commands.hidden_states",
                      "Run the frozen target over the corpus and write hidden-state shards."),
    "train": ("scylla.commands.train", "Train a draft (scylla or eagle3) on hidden-state shards."),
    "validate": ("scylla.commands.validate",
                 "Validate trained drafts on another text's validation shards."),
    "export": ("scylla.commands.export",
               "Write a draft as an EAGLE / EAGLE-3 head for vLLM and SGLang (docs/export.md)."),
}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
                       ) -> None:
    """One ``--field`` flag per dataclass field, typed and documented from the field."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def add_profile_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--profile``, the same flag and default (``$SCYLLA_PROFILE``, else quick) for every
    command that reads or runs a sweep profile; ``what`` says what it picks."""
    parser.add_argument("--profile", default=default_profile(),
                        help=f"{what}: quick (minutes on a CPU) or paper (hours); default "
                             f"${PROFILE_ENV}, else {DEFAULT_PROFILE}.")


def say(*args: Any, **kwargs: Any) -> None:
    """``print`` for a stage's own report, left out when a driver (``scylla sweep``, the main
    job, an MLproject entry) runs the stage: the driver prints one line per call instead."""
    if not run_context():
        print(*args, **kwargs)


def quiet() -> None:
    """Keep library chatter out of a command's output: Lightning's banners and tips (its
    rank-zero INFO logger), transformers' per-weight loading bars and MLflow's INFO notes (both
    read from the environment when the library is first imported), and a deprecation torch
    raises inside Lightning."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its store-migration notes
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet()
    parser = argparse.ArgumentParser(prog="scylla")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported (torch & co. are slow to import).
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ScyllaError as e:
        print(f"scylla {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
