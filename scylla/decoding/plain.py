"""Plain autoregressive decoding on our forward: one target forward per new token (τ = 1).

Prompts of different lengths share a batch: ``scylla.decoding.prefill`` fills each row's cache
with its own prompt, and every step appends one token per row at that row's own
position. A row that hits EOS or ``max_new_tokens`` leaves the batch (its cache row is dropped),
so finished rows cost nothing and no row's output depends on the others.
"""
from __future__ import annotations

from typing import Any

import torch

from scylla.decoding.prefill import prefill
from scylla.decoding.result import DecodeResult, RowStats
from scylla.decoding.sampling import sample
from scylla.decoding.timing import Stopwatch
from scylla.errors import ConfigError, DataError
from scylla.modeling import KVCache, LlamaFamilyModel


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


def _decode_batch(model: LlamaFamilyModel, prompts: list[list[int]], max_new_tokens: int,
                  eos: set[int], temperature: float, top_p: float,
                  generator: torch.Generator | None, clock: Stopwatch
                  ) -> tuple[list[list[int]], list[RowStats]]:
    device = model.device
    width = max(len(p) for p in prompts)
    with clock("verify"):
        pre = prefill(model, prompts, width + max_new_tokens, (), temperature, top_p, generator)
    cache: KVCache = pre.cache

    tokens: list[list[int]] = [[] for _ in prompts]
    stats = [RowStats() for _ in prompts]
    active = list(range(len(prompts)))  # original row of each cache row
    nxt = pre.first  # (B_active,)
    while True:
        still = []
        for r, tok in enumerate(nxt.tolist()):
            row = active[r]
            tokens[row].append(tok)
            s = stats[row]
            s.new_tokens += 1
            s.target_forwards += 1
            s.accepted_lengths.append(1)
            if tok not in eos and len(tokens[row]) < max_new_tokens:
                still.append(r)
        if not still:
            break
        if len(still) < len(active):
            keep = torch.tensor(still, device=device)
            cache, nxt = cache.select(keep), nxt.index_select(0, keep)
            active = [active[r] for r in still]
        with clock("verify"):
            logits = model(nxt[:, None], cache=cache).logits[:, -1]  # (B_active, V)
        nxt = sample(logits, temperature, top_p, generator)
    return tokens, stats


@torch.inference_mode()
def plain_decode(model: LlamaFamilyModel, prompts: list[list[int]], max_new_tokens: int,
                 eos_token_ids: list[int], temperature: float = 0.0, sample_top_p: float = 1.0,
                 generator: torch.Generator | None = None,
                 decode_batch_size: int | None = None) -> DecodeResult:
    """Decode every prompt (token ids) for up to ``max_new_tokens`` new tokens each, stopping a
    row at its first token in ``eos_token_ids`` (kept in its output). Greedy at temperature 0,
    else sampled with temperature and top-p (``scylla.decoding.sampling``, as every method).
    ``decode_batch_size`` prompts run together (all of them when None). ``seconds`` splits
    wall time into "verify" (target forwards, prefill included), "other" and "total" ("draft"
    is 0)."""
    check_prompts(prompts, max_new_tokens, model.config.max_position_embeddings)
    if temperature < 0 or not 0 < sample_top_p <= 1:
        raise ConfigError(f"temperature={temperature} must be >= 0 and sample_top_p="
                          f"{sample_top_p} in (0, 1]")
    if decode_batch_size is not None and decode_batch_size < 1:
        raise ConfigError(f"decode_batch_size={decode_batch_size}: must be >= 1")
    batch = decode_batch_size or max(1, len(prompts))
    clock = Stopwatch(model.device)
    eos = set(eos_token_ids)
    tokens: list[list[int]] = []
    stats: list[RowStats] = []
    for lo in range(0, len(prompts), batch):
        t, s = _decode_batch(model, prompts[lo: lo + batch], max_new_tokens, eos, temperature,
                             sample_top_p, generator, clock)
        tokens += t
        stats += s
    return DecodeResult(tokens, stats, clock.seconds())


def run_plain(target: Any, prompts: list[list[int]], cfg: Any, draft: Any = None) -> DecodeResult:
    """``scylla.decoding.METHODS["plain"]``: plain decoding of a Target under a DecodeConfig
    (``draft`` is ignored)."""
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=target.model.device).manual_seed(cfg.seed)
    return plain_decode(target.model, prompts, cfg.max_new_tokens, target.eos_token_ids,
                        cfg.temperature, cfg.sample_top_p, generator, cfg.decode_batch_size)
