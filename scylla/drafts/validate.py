"""A trained draft's validation metrics on another text than the one it was validated on.

``validate_draft`` runs the training module's validation (``scylla.drafts.module``: the same
``val/*`` metrics, the same code) on a validation split of hidden-state shards, for a draft that
is already trained: the ShareGPT drafts of a sweep measured on the target's own answers to the
same conversations, say. ``validation_config`` is the draft's recorded training config with the
validation budget replaced, so the unrolled chain length and loss weights are the ones the
draft was trained and validated with.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from scylla.config import TrainConfig
from scylla.data.hidden_states import slug
from scylla.drafts.data import DraftDataModule, Plan, SequenceSource
from scylla.drafts.model import DraftModel
from scylla.drafts.module import DraftTraining
from scylla.drafts.spec import DraftSpec
from scylla.errors import DataError


def validation_config(spec: DraftSpec, val_tokens: int, where: str) -> TrainConfig:
    """The draft's training config (its card's ``train`` record) validating ``val_tokens``."""
    recorded = spec.extra.get("train")
    if not recorded:
        raise DataError(f"{where} records no training config, so its validation settings "
                        "(chain length, loss weights, max_seq_len) are unknown")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in recorded.items() if k in names})
    return dataclasses.replace(cfg, val_tokens=val_tokens)


def validate_draft(draft: DraftModel, cfg: TrainConfig, val: SequenceSource, *,
                   accelerator: str = "auto", progress: bool = True) -> dict[str, float]:
    """``val/*`` of ``draft`` on ``val`` (one Lightning validation pass, nothing written)."""
    import lightning as L

    module = DraftTraining(draft.float().eval(), cfg, total_steps=1)
    data = DraftDataModule(val, val, Plan([]), cfg.train_batch_size)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def metric_prefix(tag: str) -> str:
    """``val_on/<data>/``: the metrics of a validation on data ``tag``
    (``scylla.drafts.train.data_tag``; a corpus path as its slug), apart from a run's ``val/*``."""
    return f"val_on/{slug(tag)}/"


def metric_names(metrics: dict[str, Any], tag: str) -> dict[str, Any]:
    """``val/tau_chain`` -> ``val_on/<data>/tau_chain`` (``metric_prefix``)."""
    return {metric_prefix(tag) + k.removeprefix("val/"): v for k, v in metrics.items()}
