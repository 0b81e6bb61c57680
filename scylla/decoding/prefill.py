"""The target's prefill of a group of prompts: right-padded, one forward, first token each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scylla.decoding import sampling


@dataclass
class Prefill:
    prompts: list[list[int]]
    ids: torch.Tensor  # (B, T) right-padded prompt ids
    lengths: torch.Tensor  # (B,) prompt lengths
    first: torch.Tensor  # (B,) the first new token of each row
    target_out: Any  # the target's ForwardOutput over ``ids`` (features for a draft's prefill)
    cache: Any  # the target's KVCache holding the prompts
    max_len: int  # cache capacity (a draft's cache gets the same)


def prefill(model: Any, prompts: list[list[int]], max_len: int, hidden_layers: tuple[int, ...],
            temperature: float, top_p: float, generator: torch.Generator | None) -> Prefill:
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.new_cache(len(prompts), max_len)
    # logits only at each row's last position: a (B, T, V) tensor would dwarf the forward
    out = model(ids, cache=cache, hidden_layers=hidden_layers, compute_logits=False)
    cache.set_lengths(lengths)  # drop the padding; later appends overwrite it
    rows = torch.arange(len(prompts), device=device)
    logits = model.lm_head(out.last_hidden[rows, lengths - 1])  # (B, V)
    first = sampling.sample(logits, temperature, top_p, generator)
    return Prefill(prompts, ids, lengths, first, out, cache, max_len)
