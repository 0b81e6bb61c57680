"""Decoding as a Lightning evaluation loop: a prompt DataModule and a LightningModule whose test
(or predict) step decodes a group of prompts with one of ``METHODS``.

Lightning places the target and the draft (both submodules) on whatever accelerator it runs on
and hands the metrics to its logger (MLflow like training: ``MLFlowLogger`` on the project's
store). Each step decodes ``prompts_per_step`` prompts, ``decode_batch_size`` rows at a time
with continuous batching inside the step; the metrics are ratios of the summed raw counts of
all steps (``scylla.decoding.metrics``), overall and per category.
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
from scylla.decoding.metrics import by_category, summarize
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
    def __init__(self, target: Any, prompts: list[list[int]], categories: list[str],
                 cfg: DecodeConfig, draft: nn.Module | None = None):
        super().__init__()
        self.target, self.prompts, self.categories, self.cfg = target, prompts, categories, cfg
        self.model = target.model  # submodules: Lightning moves them to its device
        self.draft = draft
        self.results: dict[int, tuple[list[int], Any]] = {}
        self.seconds: dict[str, float] = {}

    def decode(self, idx: list[int]) -> DecodeResult:
        res = METHODS[self.cfg.method](self.target, [self.prompts[i] for i in idx], self.cfg,
                                       self.draft)
        for i, toks, stats in zip(idx, res.tokens, res.stats):
            self.results[i] = (toks, stats)
        for k, v in res.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        return res

    def test_step(self, batch: list[int], batch_idx: int) -> None:
        self.decode(batch)

    def predict_step(self, batch: list[int], batch_idx: int) -> list[list[int]]:
        return self.decode(batch).tokens

    def on_test_epoch_end(self) -> None:
        result = self.result()
        metrics = summarize(result.stats, result.seconds.get("total"))
        for part in ("draft", "verify", "other"):
            metrics[f"decode/seconds_{part}"] = result.seconds.get(part, 0.0)
        cats = [self.categories[i] for i in sorted(self.results)]
        for cat, m in by_category(result, cats).items():
            metrics.update({f"{k}/{cat}": v for k, v in m.items()
                            if k in ("decode/tau", "decode/alpha", "decode/tokens_per_s")})
        # NaN (e.g. alpha of a method that proposes nothing) is not a loggable value
        self.log_dict({k: v for k, v in metrics.items() if v == v}, batch_size=len(result.stats))

    def result(self) -> DecodeResult:
        order = sorted(self.results)
        return DecodeResult([self.results[i][0] for i in order],
                            [self.results[i][1] for i in order], dict(self.seconds))


def evaluate(target: Any, prompts: list[list[int]], cfg: DecodeConfig,
             draft: nn.Module | None = None, categories: list[str] | None = None,
             prompts_per_step: int | None = None, logger: Any = False,
             accelerator: str = "auto") -> tuple[DecodeResult, dict[str, float]]:
    """Decode ``prompts`` in a Lightning test loop; returns the result and the logged metrics.

    logger: a Lightning logger, e.g. ``MLFlowLogger(tracking_uri=paths.tracking_uri(),
    run_id=run.info.run_id)`` inside ``tracking.stage_run("decode", ...)``; False for none.
    """
    categories = categories or ["all"] * len(prompts)
    module = DecodeEvaluation(target, prompts, categories, cfg, draft)
    data = PromptData(len(prompts), prompts_per_step or 4 * cfg.decode_batch_size)
    # Lightning's banner (available accelerators, tips) on every call would bury a bench's table
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=logger,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False)
        with torch.inference_mode():
            out = trainer.test(module, datamodule=data, verbose=False)
    finally:
        banner.setLevel(level)
    return module.result(), out[0] if out else {}
