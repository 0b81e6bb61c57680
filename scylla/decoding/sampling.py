"""Turning logits into the distribution a method samples from, identically for target and draft.

``probs`` applies temperature and nucleus (top-p) truncation; ``sample`` draws from it (argmax
at temperature 0); ``sample_without_replacement`` draws k distinct tokens in sampling order
(Gumbel-top-k), which is how tree drafting proposes sibling candidates at T > 0.
"""
from __future__ import annotations

import torch


def probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities at ``temperature`` > 0 after top-p.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (a token is
    kept when the mass of the tokens ranked above it is below ``top_p``), then renormalises.
    """
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return p
    sorted_p, order = p.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass ranked strictly above each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    p = torch.zeros_like(p).scatter_(-1, order, sorted_p)
    return p / p.sum(-1, keepdim=True)


def log_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Log of ``probs`` (-inf outside the nucleus); at temperature 0, plain log-softmax."""
    if temperature == 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return probs(logits, temperature, top_p).log()


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) -> (...) token ids: argmax at temperature 0, else a draw from ``probs``."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(probs(logits, temperature, top_p), generator)


def draw(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities (rows need not be normalised) -> (...) one draw per row."""
    flat = p.reshape(-1, p.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(p.shape[:-1])


def sample_without_replacement(logp: torch.Tensor, k: int,
                               generator: torch.Generator | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct tokens per row of (..., V) log-probabilities, in sampling order.

    Gumbel-top-k: the top k of logp + Gumbel noise are a sample without replacement whose
    order is the sequential draw order (token 2 drawn from the renormalised rest, ...).
    Returns (ids (..., k), their logp (..., k)); a logp of -inf marks a draw that could not
    happen (fewer than k tokens with mass).
    """
    u = torch.rand(logp.shape, device=logp.device, generator=generator)
    # -log(-log(u)) is Gumbel(0, 1); clamp keeps log finite at u = 0
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    ids = (logp + gumbel).topk(k, dim=-1).indices
    return ids, logp.gather(-1, ids)
