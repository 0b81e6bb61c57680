"""``scylla train`` (stage ``train``): train a draft (``scylla.drafts.train``) in one MLflow run.

One MLflow run per training, tagged ``stage=train``: every config field as a param (with
``train_tokens``, ``draft_n_layer``, ``seed`` among them), the derived ``draft_params``, and the
metrics of ``scylla.drafts.module``. The output directory holds the checkpoint, the MLflow run
id and, at the end, the draft and ``result.json``. Run the same command again after a kill and
it resumes from the checkpoint, in the same MLflow run, and ends where an uninterrupted run
ends; once ``result.json`` exists the command only reports it.

``--init-from <draft>`` continues a draft on the next ``--train-tokens`` of the fixed order it
has not seen (its card lists the slices and the cumulative tokens). A pruned draft
(``--draft-vocab-size``) takes its tokens from one fixed vocabulary file (``--vocab``), the same
for every budget.

Multi-process training: ``--devices 2 --strategy ddp`` (on CPU with gloo). Lightning starts the
other ranks by re-running the command; they find the MLflow run id in ``SCYLLA_TRAIN_RUN_ID``.
Several nodes: ``--num-nodes N`` with every process started by torchrun or SLURM's srun; then
only global rank 0 opens the MLflow run (docs/scale-out.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.loggers import MLFlowLogger

from scylla import paths
from scylla.commands.cli import add_dataclass_args, dataclass_from_args, say
from scylla.config import DraftConfig, TargetSpec, TrainConfig, as_params
from scylla.data.hidden_states import (
    HiddenStatesConfig,
    feature_layer_indices,
    open_corpus,
    shard_root,
)
from scylla.drafts.data import online_features
from scylla.drafts.train import (
    DATA_SKIP,
    check_strategy,
    data_config,
    data_tag,
    default_out,
    draft_vocabulary,
    online_sources,
    shard_sources,
    train_draft,
)
from scylla.errors import ConfigError
from scylla.modeling.targets import load_target
from scylla.pipeline.owner import OWNER_TAG, owner_id
from scylla.pipeline.tracking import stage_run
from scylla.store import mlflow_client_ready

RUN_ENV = "SCYLLA_TRAIN_RUN_ID"
RUN_FILE = "mlflow_run.json"
RESULT_FILE = "result.json"


def started_as_rank_zero() -> bool:
    """False for a process started as another rank than global rank 0 by a cluster
    launcher: torchrun (RANK), srun (SLURM_PROCID), or by hand on node k > 0 of a general
    cluster (NODE_RANK). The ranks Lightning itself starts carry RUN_ENV instead."""
    return all(int(os.environ.get(var) or 0) == 0
               for var in ("RANK", "SLURM_PROCID", "NODE_RANK"))


def mlflow_logger(run_id: str | None) -> Any:
    """Lightning's logger into MLflow run ``run_id``; False for none."""
    return MLFlowLogger(tracking_uri=paths.tracking_uri(), run_id=run_id) if run_id else False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TargetSpec)
    add_dataclass_args(parser, DraftConfig)
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, HiddenStatesConfig, skip=DATA_SKIP)
    g = parser.add_argument_group("run")
    g.add_argument("--out", default="", help="Output directory (checkpoints, draft); '' = "
                   "derived from the params under the data dir.")
    g.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu).")
    g.add_argument("--devices", type=int, default=1, help="Processes / devices per node.")
    g.add_argument("--num-nodes", type=int, default=1, help="Nodes (Lightning's num_nodes); "
                   "start the command on each with torchrun or srun (docs/scale-out.md).")
    g.add_argument("--strategy", default="auto", help="Lightning strategy: auto, ddp, "
                   "ddp_spawn, fsdp (GPUs only), ...")
    g.add_argument("--no-mlflow", action="store_true", help="Do not log an MLflow run.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")


def trainer_placement(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that place training on devices and nodes, checked before anything loads."""
    check_strategy(args.strategy, args.accelerator)
    return dict(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                strategy=args.strategy)


def resolve_shard_root(data: HiddenStatesConfig, target: Any, layers: tuple[int, ...]) -> Path:
    if data.shards:
        return Path(data.shards).expanduser()
    corpus = open_corpus(data, target.tokenizer, "train")
    return shard_root(data, target, corpus.dir.name, layers)


def run(args: argparse.Namespace) -> int:
    placement = trainer_placement(args)
    spec = dataclass_from_args(TargetSpec, args)
    draft_cfg = dataclass_from_args(DraftConfig, args)
    cfg = dataclass_from_args(TrainConfig, args)
    data = data_config(draft_cfg, cfg, dataclass_from_args(
        HiddenStatesConfig, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                  if k not in DATA_SKIP})))
    params = {**as_params(spec), **as_params(draft_cfg), **as_params(cfg),
              **{k: v for k, v in as_params(data).items() if k not in DATA_SKIP}}
    target = load_target(spec)
    layers = feature_layer_indices(data.feature_layers, target.model.config.num_hidden_layers)
    out = Path(args.out).expanduser() if args.out else default_out(target, params, draft_cfg, cfg)
    if (out / RESULT_FILE).is_file():
        say(f"already trained: {out / RESULT_FILE}\n{(out / RESULT_FILE).read_text()}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if cfg.online:
        train, val = online_sources(data, target, cfg)
        features = online_features(target.model, layers)
    else:
        train, val = shard_sources(resolve_shard_root(data, target, layers), target, cfg, layers,
                                   data_tag(data))
        features = None
    kwargs = dict(features=features, progress=not args.no_progress, corpus=data_tag(data),
                  vocab=draft_vocabulary(data, target, draft_cfg, cfg, not args.no_progress),
                  **placement)
    child_run = os.environ.get(RUN_ENV)
    # a DDP rank started by Lightning (logs into rank 0's run), a rank > 0 started by a
    # cluster launcher (rank 0 logs), or no tracking
    if args.no_mlflow or child_run or not started_as_rank_zero():
        res = train_draft(target, draft_cfg, cfg, train, val, out, logger=mlflow_logger(child_run),
                          **kwargs)
    else:
        with train_run(out, params) as run_obj:
            os.environ[RUN_ENV] = run_obj.info.run_id
            try:
                res = train_draft(target, draft_cfg, cfg, train, val, out,
                                  logger=mlflow_logger(run_obj.info.run_id), **kwargs)
            finally:
                os.environ.pop(RUN_ENV, None)
            log_result(res)
    if "draft" in res:
        (out / RESULT_FILE).write_text(json.dumps(res, indent=1))
        say(json.dumps({k: res[k] for k in sorted(res)
                        if k.startswith(("val/", "start/val/", "draft"))}, indent=1))
    return 0


def train_run(out: Path, params: dict[str, Any]) -> Any:
    """The stage's MLflow run: a new one, or the one a killed attempt in ``out`` started."""
    record = out / RUN_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["params"] != json.loads(json.dumps(params, default=str)):
            raise ConfigError(f"{out} holds a training with other params; use another --out")
        mlflow = mlflow_client_ready()
        # this process owns the run now (``scylla.pipeline.tracking.close_abandoned``)
        return mlflow.start_run(run_id=saved["run_id"], tags={OWNER_TAG: owner_id()})

    @contextlib.contextmanager
    def fresh() -> Any:
        with stage_run("train", params) as run_obj:
            record.write_text(json.dumps({"run_id": run_obj.info.run_id,
                                          "params": json.loads(json.dumps(params, default=str))}))
            yield run_obj

    return fresh()


def log_result(res: dict[str, Any]) -> None:
    # a continued draft's validation before its new slice (Lightning logged it as val/* at
    # step 0 too; these names keep it apart from the final values)
    mlflow.log_metrics({k: v for k, v in res.items() if k.startswith("start/val/")})
    if "draft" in res:
        mlflow.set_tag("draft", res["draft"])
        mlflow.log_artifact(str(Path(res["draft"]) / "draft.json"))
