"""Plain autoregressive decoding on our forward: one target forward per new token (τ = 1).

It is the shared engine (``scylla.decoding.engine``) with a proposer that proposes nothing, so
plain decoding and a speculative run that settles on plain decoding run the same loop: prompts
of different lengths share a batch (each row's cache is prefilled with its own prompt and every
step appends one token per row at that row's own position), a row that hits EOS or
``max_new_tokens`` gives its slot to the next waiting prompt, and no row's output depends on
the others.
"""
from __future__ import annotations

from typing import Any

import torch

from scylla.decoding.engine import Decoder
from scylla.decoding.prefill import Prefill, check_prompts
from scylla.decoding.result import DecodeResult
from scylla.errors import ConfigError
from scylla.modeling import LlamaFamilyModel


class _NoState:
    """The proposer state of plain decoding: nothing to keep per row."""

    def select(self, rows: torch.Tensor) -> "_NoState":
        return self

    def put(self, rows: torch.Tensor, other: "_NoState") -> None:
        pass


class Plain:
    """The proposer of plain decoding: proposes nothing, so every step is ``Decoder.plain_step``
    (one forward, one token per row)."""

    hidden_layers: tuple[int, ...] = ()
    room = 0
    forwards_per_step = 0
    prefill_forwards = 0
    plain = True

    def start(self, pre: Prefill) -> _NoState:
        return _NoState()


@torch.inference_mode()
def plain_decode(model: LlamaFamilyModel, prompts: list[list[int]], max_new_tokens: int,
                 eos_token_ids: list[int], temperature: float = 0.0, sample_top_p: float = 1.0,
                 generator: torch.Generator | None = None,
                 decode_batch_size: int | None = None) -> DecodeResult:
    """Decode every prompt (token ids) for up to ``max_new_tokens`` new tokens each, stopping a
    row at its first token in ``eos_token_ids`` (kept in its output). Greedy at temperature 0,
    else sampled with temperature and top-p (``scylla.decoding.sampling``, as every method)
    from ``generator`` (seed 0 when None). Up to ``decode_batch_size`` prompts decode together
    (all of them when None). ``seconds`` splits wall time into "verify" (target forwards,
    prefill included), "other" and "total" ("draft", the empty proposer's start, is ~0)."""
    check_prompts(prompts, max_new_tokens, model.config.max_position_embeddings)
    if temperature < 0 or not 0 < sample_top_p <= 1:
        raise ConfigError(f"temperature={temperature} must be >= 0 and sample_top_p="
                          f"{sample_top_p} in (0, 1]")
    if decode_batch_size is not None and decode_batch_size < 1:
        raise ConfigError(f"decode_batch_size={decode_batch_size}: must be >= 1")
    if not prompts:
        return DecodeResult([], [], {"draft": 0.0, "verify": 0.0, "other": 0.0, "total": 0.0})
    return Decoder(model, prompts, Plain(), max_new_tokens, decode_batch_size or len(prompts),
                   temperature, sample_top_p, eos_token_ids=eos_token_ids,
                   generator=generator).run()


def run_plain(target: Any, prompts: list[list[int]], cfg: Any, draft: Any = None) -> DecodeResult:
    """``scylla.decoding.METHODS["plain"]``: plain decoding of a Target under a DecodeConfig
    (``draft`` is ignored)."""
    generator = torch.Generator(device=target.model.device).manual_seed(cfg.seed)
    return plain_decode(target.model, prompts, cfg.max_new_tokens, target.eos_token_ids,
                        cfg.temperature, cfg.sample_top_p, generator, cfg.decode_batch_size)
