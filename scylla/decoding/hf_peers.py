"""Peer methods run through transformers' own ``generate``: the baselines we compare with.

- ``hf``: greedy (or sampled) ``generate`` on the HF model of the same target.
- ``hf-assisted-pld``: ``generate(prompt_lookup_num_tokens=draft_len)``, transformers'
  prompt-lookup speculative decoding. transformers' assisted generation takes one prompt at a
  time, so batches are decoded row by row (the table says so).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from scylla.config import DecodeConfig
from scylla.decoding.result import DecodeResult, RowStats
from scylla.decoding.timing import synchronize


def _cut_at_eos(tokens: list[int], eos: set[int], limit: int) -> list[int]:
    out = []
    for t in tokens[:limit]:
        out.append(t)
        if t in eos:
            break
    return out


class ForwardCounter:
    """Counts forward calls of a module (one per target forward in ``generate``)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def _generate_kwargs(cfg: DecodeConfig, tokenizer: Any, eos: list[int]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id
                              if tokenizer.pad_token_id is not None else eos[0])
    if cfg.temperature > 0:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.sample_top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


@torch.inference_mode()
def hf_generate(hf_model: Any, tokenizer: Any, prompts: list[list[int]], cfg: DecodeConfig,
                eos_token_ids: list[int], assisted_pld: bool = False) -> DecodeResult:
    device = next(hf_model.parameters()).device
    eos = set(eos_token_ids)
    kw = _generate_kwargs(cfg, tokenizer, eos_token_ids)
    batch = 1 if assisted_pld else cfg.decode_batch_size
    if assisted_pld:
        kw["prompt_lookup_num_tokens"] = cfg.draft_len
    pad = kw["pad_token_id"]
    tokens: list[list[int]] = []
    stats: list[RowStats] = []
    counter = ForwardCounter(hf_model)
    synchronize(device)
    start = time.perf_counter()
    try:
        for lo in range(0, len(prompts), batch):
            rows = prompts[lo:lo + batch]
            width = max(len(r) for r in rows)
            # Left padding: generate appends new tokens on the right of every row.
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                device=device)
            calls_before = counter.calls
            out = hf_model.generate(input_ids=ids, attention_mask=mask, **kw)
            forwards = counter.calls - calls_before
            for row in out[:, width:].tolist():
                new = _cut_at_eos(row, eos, cfg.max_new_tokens)
                tokens.append(new)
                # Plain generate emits one token per active row per forward, so a row's
                # forwards are its new tokens; assisted generation runs one row per call.
                stats.append(RowStats(new_tokens=len(new),
                                      target_forwards=forwards if assisted_pld else len(new)))
    finally:
        counter.close()
    synchronize(device)
    total = time.perf_counter() - start
    return DecodeResult(tokens=tokens, stats=stats, seconds={"total": total})
