"""Decoding as a Lightning evaluation loop: a prompt DataModule and a LightningModule whose test
(or predict) step decodes a group of prompts with one of ``METHODS``.

Lightning places the target and the draft (both submodules) on whatever accelerator it runs on.
Each step decodes ``prompts_per_step`` prompts, ``decode_batch_size`` rows at a time with
continuous batching inside the step; the result holds every prompt's tokens and raw counts, from
which ``scylla.decoding.metrics.decode_metrics`` computes the logged ``decode/*`` metrics (the
decode stage, ``scylla bench``, logs them once it has compared the methods).
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from scylla.config import DecodeConfig
from scylla.decoding.methods import METHODS
from scylla.decoding.result import DecodeResult


class PromptData(L.LightningDataModule):
    """Prompt indices in groups; the module looks the token ids up."""

    def __init__(self, n_prompts: int, prompts_per_step: int):
        super().__init__()
        self.n_prompts, self.prompts_per_step = n_prompts, prompts_per_step

    def _loader(self) -> DataLoader:
        return DataLoader(range(self.n_prompts), batch_size=self.prompts_per_step,
                          collate_fn=list)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class DecodeEvaluation(L.LightningModule):
    def __init__(self, target: Any, prompts: list[list[int]], cfg: DecodeConfig,
                 draft: nn.Module | None = None):
        super().__init__()
        self.target, self.prompts, self.cfg = target, prompts, cfg
        self.model = target.model  # submodules: Lightning moves them to its device
        self.draft = draft
        self.results: dict[int, tuple[list[int], Any]] = {}
        self.seconds: dict[str, float] = {}
        self.plan: dict[str, Any] = {}  # the planner's choice in the last step's decode

    def decode(self, idx: list[int]) -> DecodeResult:
        res = METHODS[self.cfg.method](self.target, [self.prompts[i] for i in idx], self.cfg,
                                       self.draft)
        for i, toks, stats in zip(idx, res.tokens, res.stats):
            self.results[i] = (toks, stats)
        for k, v in res.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.plan = res.plan or self.plan
        return res

    def test_step(self, batch: list[int], batch_idx: int) -> None:
        self.decode(batch)

    def predict_step(self, batch: list[int], batch_idx: int) -> list[list[int]]:
        return self.decode(batch).tokens

    def result(self) -> DecodeResult:
        order = sorted(self.results)
        return DecodeResult([self.results[i][0] for i in order],
                            [self.results[i][1] for i in order], dict(self.seconds),
                            dict(self.plan))


def evaluate(target: Any, prompts: list[list[int]], cfg: DecodeConfig,
             draft: nn.Module | None = None, prompts_per_step: int | None = None,
             accelerator: str = "auto") -> DecodeResult:
    """Decode ``prompts`` in a Lightning test loop (on Lightning's device); returns the result,
    whose metrics ``scylla.decoding.metrics.decode_metrics`` computes."""
    module = DecodeEvaluation(target, prompts, cfg, draft)
    data = PromptData(len(prompts), prompts_per_step or 4 * cfg.decode_batch_size)
    # Lightning's banner (available accelerators, tips) on every call would bury a bench's table
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False)
        with torch.inference_mode():
            trainer.test(module, datamodule=data, verbose=False)
    finally:
        banner.setLevel(level)
    return module.result()
