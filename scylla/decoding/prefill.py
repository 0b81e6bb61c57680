"""The target's prefill of a group of prompts: their caches, features and first tokens.

On a CPU each prompt is prefilled on its own into its cache row: a right-padded batch would
spend compute on every row's padding (half of all prefill work for ShareGPT prompts at batch
8), and one prompt already gives the matmuls enough rows. Accelerators take the right-padded
batch in one forward, where parallel width is cheap and launches are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scylla.decoding import sampling
from scylla.errors import ConfigError, DataError
from scylla.modeling import ForwardOutput


def check_prompts(prompts: list[list[int]], max_new_tokens: int, context: int) -> None:
    """Raise DataError for an empty prompt or one that leaves no room for the new tokens."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"prompt {i} is empty: a prompt needs at least one token")
        if len(p) + max_new_tokens > context:
            raise DataError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} > the model's context window "
                f"(max_position_embeddings={context}). Shorten the prompt or lower "
                "max_new_tokens.")


@dataclass
class Prefill:
    prompts: list[list[int]]
    ids: torch.Tensor  # (B, T) right-padded prompt ids
    lengths: torch.Tensor  # (B,) prompt lengths
    first: torch.Tensor  # (B,) the first new token of each row
    target_out: Any  # the target's ForwardOutput over ``ids`` (features for a draft's prefill)
    cache: Any  # the target's KVCache holding the prompts
    max_len: int  # cache capacity (a draft's cache gets the same)


def _row_by_row(model: Any, ids: torch.Tensor, lengths: list[int], cache: Any,
                hidden_layers: tuple[int, ...]) -> ForwardOutput:
    """Each row's real tokens in a forward of its own; outputs right-padded with zeros."""
    outs = [model(ids[b:b + 1, :n], cache=cache.row(b), hidden_layers=hidden_layers,
                  compute_logits=False) for b, n in enumerate(lengths)]

    def stitch(parts: list[torch.Tensor]) -> torch.Tensor:  # B x (1, n_b, H) -> (B, T, H)
        out = parts[0].new_zeros(len(parts), ids.shape[1], parts[0].shape[-1])
        for b, part in enumerate(parts):
            out[b, :part.shape[1]] = part[0]
        return out

    hidden = {i: stitch([o.hidden[i] for o in outs]) for i in outs[0].hidden}
    return ForwardOutput(None, stitch([o.last_hidden for o in outs]), hidden)


def prefill(model: Any, prompts: list[list[int]], max_len: int, hidden_layers: tuple[int, ...],
            temperature: float, top_p: float, generator: torch.Generator | None) -> Prefill:
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.new_cache(len(prompts), max_len)
    if device.type == "cpu" and len(prompts) > 1:
        out = _row_by_row(model, ids, [len(p) for p in prompts], cache, hidden_layers)
    else:
        # logits only at each row's last position: a (B, T, V) tensor would dwarf the forward
        out = model(ids, cache=cache, hidden_layers=hidden_layers, compute_logits=False)
    cache.set_lengths(lengths)  # drop the padding; later appends overwrite it
    rows = torch.arange(len(prompts), device=device)
    logits = model.lm_head(out.last_hidden[rows, lengths - 1])  # (B, V)
    first = sampling.sample(logits, temperature, top_p, generator)
    return Prefill(prompts, ids, lengths, first, out, cache, max_len)
