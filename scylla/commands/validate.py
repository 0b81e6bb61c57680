"""``scylla validate``: trained drafts validated on another text (``scylla.drafts.validate``).

The drafts are given by path (``--draft``, repeatable) or as every finished train run of an
MLflow experiment (``--experiment``, e.g. ``theorem_1_1_data-fixed_vocab``). The text is the
validation split the data flags name, built beforehand by ``scylla hidden-states`` with the
same flags (the target's own answers: ``--answers target``). For a run, the metrics are logged
into it as ``val_on/<data>/*`` (``val_on/sharegpt-target-greedy-n512/tau_chain``) beside its
own ``val/*``, so a sweep file's fits and the notebooks fit them like any train metric; a run
that carries them already is skipped, so a stopped command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from scylla.analysis.runs import load_runs
from scylla.commands.cli import add_dataclass_args, dataclass_from_args, say
from scylla.commands.train import resolve_shard_root
from scylla.config import TargetSpec
from scylla.data.hidden_states import HiddenStatesConfig
from scylla.drafts.checkpoint import draft_dir, load_draft, read_spec
from scylla.drafts.train import data_tag, val_shards
from scylla.drafts.validate import (
    metric_names,
    metric_prefix,
    validate_draft,
    validation_config,
)
from scylla.errors import ConfigError, DataError
from scylla.modeling.targets import load_target
from scylla.store import TAG, mlflow_client_ready

# build-only flags of `scylla hidden-states`: the draft's record fixes max_seq_len and layers
DATA_SKIP = ("build_tokens", "max_seq_len", "feature_layers", "tokens_per_shard",
             "build_batch_tokens", "answer_batch_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TargetSpec)
    add_dataclass_args(parser, HiddenStatesConfig, skip=DATA_SKIP)
    g = parser.add_argument_group("drafts")
    g.add_argument("--draft", action="append", default=[],
                   help="A draft directory (repeatable).")
    g.add_argument("--experiment", default="",
                   help="Validate the draft of every finished train run of this MLflow "
                        "experiment and log the metrics into the run.")
    g.add_argument("--no-progress", action="store_true", help="No progress bars.")


def drafts_to_validate(args: argparse.Namespace, done_metric: str
                       ) -> list[tuple[str, str | None, bool]]:
    """(draft path, train run id or None, whether the run has ``done_metric`` already) of every
    draft the flags name."""
    out: list[tuple[str, str | None, bool]] = [(d, None, False) for d in args.draft]
    if args.experiment:
        runs = load_runs(args.experiment, stage="train", tags={"draft": "draft_dir"})
        if runs.empty:
            raise ConfigError(f"--experiment {args.experiment!r}: no finished train run")
        done = runs[done_metric].notna() if done_metric in runs else [False] * len(runs)
        for run_id, path, was_done in zip(runs["run_id"], runs["draft_dir"], done):
            if not isinstance(path, str):
                raise DataError(f"train run {run_id} of {args.experiment} names no draft")
            out.append((path, run_id, bool(was_done)))
    if not out:
        raise ConfigError("name drafts with --draft or --experiment")
    return out


def run(args: argparse.Namespace) -> int:
    data = dataclass_from_args(HiddenStatesConfig, args)
    if not data.val_tokens:
        raise ConfigError("HiddenStatesConfig.val_tokens=0: there is nothing to validate on")
    tag = data_tag(data)
    prefix = metric_prefix(tag)
    todo = drafts_to_validate(args, prefix + "tau_chain")
    target = load_target(dataclass_from_args(TargetSpec, args))
    client = mlflow_client_ready().MlflowClient() if args.experiment else None
    sources: dict[tuple, tuple[Path, Any]] = {}  # (max_seq_len, layers) -> val dir and shards
    results: dict[str, Any] = {}
    for path, run_id, done in todo:
        where = f"draft {path}" + (f" (train run {run_id})" if run_id else "")
        if done:
            say(f"{where}: validated on {tag} already")
            continue
        if not Path(path).expanduser().exists():
            raise DataError(f"{where} is not on this machine; train it again (the sweep "
                            "remakes it) or validate a draft that is")
        directory = draft_dir(Path(path).expanduser())
        spec = read_spec(directory)
        cfg = validation_config(spec, data.val_tokens, where)
        layers = tuple(spec.feature_layers)
        key = (cfg.max_seq_len, layers)
        if key not in sources:  # the drafts of one sweep share them: open the corpus once
            root = resolve_shard_root(dataclasses.replace(data, max_seq_len=cfg.max_seq_len),
                                      target, layers)
            sources[key] = root / "val", val_shards(root, target, cfg, layers)
        val_dir, val = sources[key]
        metrics = metric_names(validate_draft(load_draft(directory, target), cfg, val,
                                              progress=not args.no_progress), tag)
        if client is not None and run_id:
            for name, value in metrics.items():
                client.log_metric(run_id, name, value)
            client.set_tag(run_id, f"{TAG}{prefix.rstrip('/')}", str(val_dir))
        results[run_id or path] = metrics
        say(f"{where}: tau_chain {metrics[prefix + 'tau_chain']:.3f}, top-1 "
            f"{metrics[prefix + 'top1_acc']:.3f} on {val_dir}")
    say(json.dumps(results, indent=1))
    return 0
