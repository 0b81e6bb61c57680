"""The LightningModule that trains a draft: it only orchestrates (loss, optimiser, logging).

The draft is a plain ``nn.Module`` (``scylla.drafts.model``); the loss and metrics live in
``scylla.drafts.objective``; batches come from ``scylla.drafts.data``. Every random number is a
function of (seed, global step, rank), so a run resumed from a checkpoint repeats the
uninterrupted run exactly.

Metrics: ``train/loss``, ``train/loss_hidden``, ``train/loss_logits``, ``train/acc`` (step 0,
draft vocabulary), ``train/loss_step{k}`` (unrolled steps), ``train/tokens_seen`` (tokens of all
sequences consumed so far, all ranks), ``train/tokens_per_s``, ``train/lr``; ``val/loss``,
``val/top1_acc``, ``val/alpha_at_{i}``, ``val/tau_chain`` (see ``objective.tau_chain``),
``val/tau_chain_replayed`` (chain decoding replayed along the validation text:
``objective.replay``).
"""
from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch

from scylla.config import TrainConfig
from scylla.drafts.model import DraftModel
from scylla.drafts.objective import (
    chain_lengths,
    objective,
    replay,
    survival,
    tau_chain,
)
from scylla.drafts.unroll import unroll

DEFAULT_TTT_STEPS = {"scylla": 1, "eagle3": 3}


def ttt_steps_of(cfg: TrainConfig, kind: str) -> int:
    return cfg.ttt_steps or DEFAULT_TTT_STEPS[kind]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class DraftTraining(L.LightningModule):
    def __init__(self, draft: DraftModel, cfg: TrainConfig, total_steps: int):
        super().__init__()
        self.draft = draft
        self.cfg = cfg
        self.total_steps = total_steps
        self.steps = ttt_steps_of(cfg, draft.kind)
        self._val: dict[str, torch.Tensor] = {}
        self._clock: tuple[float, int] | None = None  # (start time, tokens_seen at start)

    # ---- data -> tensors
    def _features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The draft's input features (B, T, F) in its dtype."""
        if self.draft.feature_layers:
            feats = torch.cat([batch[f"hidden.{i}"] for i in self.draft.feature_layers], -1)
        else:
            feats = batch["last_hidden"]
        return feats.to(self.draft.dtype)

    def _noise(self, feats: torch.Tensor) -> torch.Tensor | None:
        """U(-a, a) noise for the step-0 features (B, n, F), seeded by (seed, step, rank)."""
        a = self.cfg.feature_noise
        if a == 0:
            return None
        g = torch.Generator().manual_seed(
            (self.cfg.seed * 1_000_003 + self.global_step) * 101 + self.global_rank)
        shape = (feats.shape[0], feats.shape[1] - 1, feats.shape[2])
        return ((torch.rand(shape, generator=g) * 2 - 1) * a).to(feats.device, feats.dtype)

    # ---- training
    def on_train_start(self) -> None:
        self._clock = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        feats = self._features(batch)
        hiddens = unroll(self.draft, batch["input_ids"], feats, self.steps, self._noise(feats))
        obj = objective(self.draft, hiddens, batch["last_hidden"], batch["loss_mask"],
                        self.cfg.w_hidden, self.cfg.w_logits, self.cfg.ttt_decay,
                        self.cfg.distill_top_k)
        first = obj.steps[0]
        rows = max(first.rows, 1)
        logs = {"train/loss": obj.loss.detach(),
                "train/loss_logits": first.ce / rows, "train/acc": first.agree / rows,
                "train/tokens_seen": float(batch["tokens_seen"]),
                "train/lr": self.optimizers().param_groups[0]["lr"]}
        if self.draft.kind != "eagle3":
            logs["train/loss_hidden"] = first.hidden / rows
        for k, s in enumerate(obj.steps[1:], start=1):
            logs[f"train/loss_step{k}"] = s.ce / max(s.rows, 1)
        now = time.perf_counter()
        if self._clock is None:  # the first step's time includes warm-up: measure after it
            self._clock = (now, int(batch["tokens_seen"]))
        elif int(batch["tokens_seen"]) > self._clock[1]:
            logs["train/tokens_per_s"] = ((int(batch["tokens_seen"]) - self._clock[1])
                                          / (now - self._clock[0]))
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False,
                      batch_size=batch["input_ids"].shape[0])
        self.log("loss", obj.loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                 logger=False, batch_size=batch["input_ids"].shape[0])
        return obj.loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.draft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, self.cfg.warmup_steps, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation
    def on_validation_epoch_start(self) -> None:
        gamma = self.cfg.val_chain_len
        self._val = {"rows": torch.zeros(3, dtype=torch.float64, device=self.device),
                     "chain": torch.zeros(gamma + 1, dtype=torch.float64, device=self.device),
                     "replay": torch.zeros(2, dtype=torch.float64, device=self.device)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        feats = self._features(batch)
        hiddens = unroll(self.draft, batch["input_ids"], feats, self.cfg.val_chain_len)
        obj = objective(self.draft, hiddens[:1], batch["last_hidden"], batch["loss_mask"],
                        self.cfg.w_hidden, self.cfg.w_logits, self.cfg.ttt_decay)
        first = obj.steps[0]
        argmax = batch.get("target_argmax")
        if argmax is None:  # old shards: the target's greedy token over the draft vocabulary
            argmax = self.draft.to_target_ids(
                self.draft.target_logits(batch["last_hidden"]).argmax(-1))
        started, accepted = chain_lengths(self.draft, hiddens, batch["loss_mask"], argmax)
        starts, chains = survival(started, accepted, len(hiddens))
        tokens, forwards = replay(started, accepted)
        loss_sum = (first.ce if self.draft.kind == "eagle3" else
                    self.cfg.w_logits * first.ce + self.cfg.w_hidden * first.hidden)
        v = self._val
        v["rows"] += torch.tensor([first.rows, loss_sum, first.agree], dtype=torch.float64,
                                  device=self.device)
        v["chain"] += torch.tensor([starts, *chains], dtype=torch.float64, device=self.device)
        v["replay"] += torch.tensor([tokens, forwards], dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        rows = self.trainer.strategy.reduce(self._val["rows"], reduce_op="sum")
        chain = self.trainer.strategy.reduce(self._val["chain"], reduce_op="sum")
        tokens, forwards = self.trainer.strategy.reduce(self._val["replay"], reduce_op="sum")
        starts, counts = int(chain[0]), [int(c) for c in chain[1:]]
        metrics = {"val/loss": float(rows[1] / max(float(rows[0]), 1.0)),
                   "val/top1_acc": counts[0] / max(starts, 1),
                   "val/tau_chain": tau_chain(counts, starts),
                   # chain decoding replayed along the text: the τ it would measure there
                   "val/tau_chain_replayed": float(tokens / max(float(forwards), 1.0)),
                   "val/rows": float(rows[0])}
        prev = starts
        for i, c in enumerate(counts, start=1):
            metrics[f"val/alpha_at_{i}"] = c / max(prev, 1)
            prev = c
        self.log_dict(metrics, sync_dist=False)
