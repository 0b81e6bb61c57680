"""Unrolling a draft on its own features over whole sequences at once (training and validation).

Step 0 is the EAGLE input: row index t gets token x_{t+1} and the target's feature at t, and its
output h0[t] predicts x_{t+2}. Step k >= 1 continues the chain started at t: index t gets token
x_{t+1+k} and the draft's own h_{k-1}[t] as feature, at position t + k, and predicts x_{t+2+k}.
In real drafting, that step attends to the draft's cache of the context (step-0 entries 0..t,
built from the target's features) and to its own earlier steps of this chain, so here the query
(k, t) sees step-0 keys s <= t and the keys (j, t) for 1 <= j <= k. This is EAGLE-3's
"training-time test"; every step keeps the sequences' length n = T - 1 (indices past the end
are padding whose loss mask is 0).

Tokens are teacher-forced (the data's x_{t+1+k}, not the draft's guesses): draft and target
then condition on the same prefix, and only the draft's features are its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scylla.drafts.model import DraftModel
from scylla.modeling import AttentionStep


def shift(x: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """x (B, T, ...) -> (B, n, ...) with row t = x[:, t + s], zero past the end."""
    out = x[:, s:s + n]
    if out.shape[1] < n:
        pad = [0, 0] * (x.dim() - 2) + [0, n - out.shape[1]]
        out = F.pad(out, pad)
    return out


def unroll_step(draft: DraftModel, n: int, k: int, batch: int, device: torch.device
                ) -> AttentionStep:
    """Attention of step k over the keys of steps 0..k laid out as [step 0 | ... | step k]."""
    c = draft.spec.layer_config
    position_ids = (torch.arange(n, device=device) + k).expand(batch, n)
    cos, sin = draft.rotary(position_ids, draft.dtype)
    eye = torch.eye(n, dtype=torch.bool, device=device)
    allowed = torch.cat([torch.ones(n, n, dtype=torch.bool, device=device).tril()]
                        + [eye] * k, dim=1)  # (n, (k+1) n)
    mask = torch.zeros(allowed.shape, dtype=draft.dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(draft.dtype).min)
    mask = mask.repeat(c.kv_groups, 1)[None, None]  # (1, 1, g*n, (k+1) n): GQA-folded rows
    return AttentionStep(cos, sin, n, (k + 1) * n, mask, write_at=k * n)


def unroll(draft: DraftModel, input_ids: torch.Tensor, features: torch.Tensor, steps: int,
           noise: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The draft's hidden states (B, n, H) of steps 0..steps-1 for input_ids (B, T) and target
    features (B, T, F); ``noise`` (B, n, F) is added to the step-0 features."""
    n = input_ids.shape[1] - 1
    feats = features[:, :n]
    if noise is not None:
        feats = feats + noise.to(feats.dtype)
    if steps == 1:  # the plain EAGLE-1/2 step: SDPA's causal path, no key buffers
        return [draft(input_ids[:, 1:], feats).hidden]
    batch, device = input_ids.shape[0], input_ids.device
    c = draft.spec.layer_config
    empty = torch.zeros(batch, c.num_key_value_heads, n, c.head_dim, device=device,
                        dtype=draft.dtype)
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(draft.layers)
    out = []
    for k in range(steps):
        # fresh buffers each step (cat, not in-place growth): autograd keeps the keys earlier
        # steps saved intact
        kv = [(empty.clone(), empty.clone()) if prev is None else (
            torch.cat([prev[0], empty], dim=2), torch.cat([prev[1], empty], dim=2))
            for prev in kv]
        out.append(draft.body(shift(input_ids, 1 + k, n), feats if k == 0 else out[-1],
                              unroll_step(draft, n, k, batch, device), kv))
    return out
