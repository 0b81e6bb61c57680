"""The training loss and the validation metrics of a draft, from unrolled hidden states.

For step k (see ``unroll``) row t predicts x_{t+2+k}; its targets are the target's post-norm
feature at position t+1+k (the feature that predicts that token) and the target's next-token
distribution there, over the draft vocabulary. Rows count where the loss mask of x_{t+2+k} is 1.

- ``scylla`` (EAGLE-1/2): ``w_hidden * SmoothL1(h, feature) + w_logits * CE(p_target, q_draft)``,
  each a mean over counted rows, summed over steps with weight ``ttt_decay**k`` (one step
  by default).
- ``eagle3``: ``sum_k ttt_decay**k * CE_k`` (EAGLE-3 drops the feature regression: its hidden
  state is not in the target's feature space). ``w_hidden`` / ``w_logits`` do not apply.
- ``top_k`` > 0 (HASS's top-K distillation): CE sums ``-p_target log q_draft`` over the target's
  K most likely tokens only, so the draft's probability mass is pushed onto the candidates
  verification can accept, not spread to match the target's tail.

The LM head over ~49k tokens dominates memory: logits are computed only on counted rows, and in
chunks under activation checkpointing when they would exceed ``LOGIT_BUDGET`` elements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scylla.drafts.model import DraftModel
from scylla.drafts.unroll import shift

# 2^25 fp32 logits = 128 MB per tensor; a chunk holds a few such tensors at once
LOGIT_BUDGET = 1 << 25
# Row counts are rounded up to a multiple of this (padding rows weigh 0): CPU BLAS prepares
# kernels once per matrix shape (~25 ms each), and the number of counted rows changes with
# every batch.
ROW_MULTIPLE = 64


def padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the True entries of ``mask`` padded with index 0 to a multiple of
    ROW_MULTIPLE, and their weights (1 real, 0 padding)."""
    idx = mask.flatten().nonzero().squeeze(1)
    pad = -len(idx) % ROW_MULTIPLE
    weight = torch.ones(len(idx) + pad, device=mask.device)
    if pad:
        weight[len(idx):] = 0
        idx = torch.cat([idx, idx.new_zeros(pad)])
    return idx, weight


@dataclass
class StepSums:
    """Sums over the counted rows of one step (raw counts: ratios are derived from sums)."""

    rows: int = 0
    ce: float = 0.0
    hidden: float = 0.0
    agree: int = 0  # draft's greedy token == target's greedy token (over the draft vocabulary)


@dataclass
class Objective:
    loss: torch.Tensor  # scalar with grad
    steps: list[StepSums] = field(default_factory=list)


def _ce_rows(draft: DraftModel, hidden: torch.Tensor, feature: torch.Tensor,
             weight: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of CE(p_target, q_draft), weighted agreeing rows) for rows (M, H); with
    ``top_k`` the sum runs over the target's ``top_k`` most likely tokens only."""
    with torch.no_grad():
        target = draft.target_logits(feature).float()  # (M, Vd)
        p = torch.softmax(target, dim=-1)
        if 0 < top_k < p.shape[-1]:
            probs, ids = p.topk(top_k, dim=-1)
            p = torch.zeros_like(p).scatter_(-1, ids, probs)
    logits = draft.readout(hidden).float()
    ce = -((p * torch.log_softmax(logits, dim=-1)).sum(-1) * weight).sum()
    agree = ((logits.detach().argmax(-1) == target.argmax(-1)).float() * weight).sum()
    return ce, agree


def soft_ce(draft: DraftModel, hidden: torch.Tensor, feature: torch.Tensor,
            weight: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, int]:
    rows = max(ROW_MULTIPLE, LOGIT_BUDGET // draft.spec.vocab_size // ROW_MULTIPLE
               * ROW_MULTIPLE)
    if hidden.shape[0] <= rows or not torch.is_grad_enabled():
        ce, agree = _ce_rows(draft, hidden, feature, weight, top_k)
        return ce, int(agree)
    ce, agree = hidden.new_zeros(()), 0
    for h, f, w in zip(hidden.split(rows), feature.split(rows), weight.split(rows)):
        c, a = checkpoint(_ce_rows, draft, h, f, w, top_k, use_reentrant=False)
        ce, agree = ce + c, agree + int(a)
    return ce, agree


def objective(draft: DraftModel, hiddens: list[torch.Tensor], last_hidden: torch.Tensor,
              loss_mask: torch.Tensor, w_hidden: float, w_logits: float,
              ttt_decay: float, top_k: int = 0) -> Objective:
    """Loss and per-step sums for unrolled ``hiddens`` (each (B, n, H)); last_hidden (B, T, H)
    the target's post-norm features, loss_mask (B, T) (0 on padding); ``top_k`` > 0 distils
    the target's ``top_k`` most likely tokens only (HASS)."""
    n = hiddens[0].shape[1]
    loss = hiddens[0].new_zeros(())
    steps = []
    for k, h in enumerate(hiddens):
        feature = shift(last_hidden, 1 + k, n).to(h.dtype)  # (B, n, H)
        mask = shift(loss_mask, 2 + k, n).bool()  # (B, n)
        rows = int(mask.sum())
        idx, w = padded_rows(mask)
        h_rows = h.flatten(0, 1)[idx]  # (M, H), M a multiple of ROW_MULTIPLE
        f_rows = feature.flatten(0, 1)[idx]
        ce, agree = soft_ce(draft, h_rows, f_rows, w, top_k)
        weight = ttt_decay ** k / max(rows, 1)
        if draft.kind == "eagle3":
            hid = h.new_zeros(())
            loss = loss + weight * ce
        else:
            hid = (F.smooth_l1_loss(h_rows, f_rows, reduction="none").mean(-1) * w).sum()
            loss = loss + weight * (w_hidden * hid + w_logits * ce)
        steps.append(StepSums(rows, float(ce.detach()), float(hid.detach()), agree))
    return Objective(loss, steps)


@torch.no_grad()
def chain_lengths(draft: DraftModel, hiddens: list[torch.Tensor], loss_mask: torch.Tensor,
                  target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, accepted), both (B, n): whether a chain starts at each row, and how many of its
    gamma = len(hiddens) draft tokens are accepted (0 where none starts).

    A chain starts at every row whose first prediction is under the loss mask; step i of it is
    accepted when the draft's greedy token (mapped to target ids) equals ``target_argmax``
    (B, T), the target's greedy next token over its full vocabulary. A step outside the loss
    mask counts as rejected (the chain stops there). Logits are computed only for live chains.
    """
    n = hiddens[0].shape[1]
    starts = shift(loss_mask, 2, n).bool()
    alive = starts
    accepted = torch.zeros(starts.shape, dtype=torch.long, device=starts.device)
    for k, h in enumerate(hiddens):
        alive = alive & shift(loss_mask, 2 + k, n).bool()
        if bool(alive.any()):
            idx, w = padded_rows(alive)
            guess = draft.to_target_ids(draft.readout(h.flatten(0, 1)[idx]).argmax(-1))
            truth = shift(target_argmax, 1 + k, n).flatten()[idx]
            ok = torch.zeros(alive.numel(), dtype=torch.bool, device=alive.device)
            ok[idx[w > 0]] = (guess == truth)[w > 0]
            alive = alive & ok.view_as(alive)
        accepted += alive
    return starts, accepted


def survival(starts: torch.Tensor, accepted: torch.Tensor, gamma: int) -> tuple[int, list[int]]:
    """(chain starts, [chains whose first i draft tokens are all accepted, i = 1..gamma])."""
    return int(starts.sum()), [int((accepted > i).sum()) for i in range(gamma)]


def chain_counts(draft: DraftModel, hiddens: list[torch.Tensor], loss_mask: torch.Tensor,
                 target_argmax: torch.Tensor) -> tuple[int, list[int]]:
    """``survival`` of the chains of ``chain_lengths``."""
    return survival(*chain_lengths(draft, hiddens, loss_mask, target_argmax), len(hiddens))


def replay(starts: torch.Tensor, accepted: torch.Tensor) -> tuple[int, int]:
    """(new tokens, target forwards) of chain decoding replayed along the validation text.

    Each run of consecutive chain starts is one answer, decoded as chain decoding decodes it:
    its first token comes from the prefill (one forward, no draft), then each step takes the
    chain's accepted draft tokens and the target's own next token (none past the answer's end,
    where decoding stops too), and the next step starts after them. Rows that start no chain
    (outside the loss mask) are stepped over. tokens / forwards is the τ chain decoding
    measures on this text at T = 0 (``decode/tau``, which counts the prefill the same way) when
    the text is the target's own greedy answers. ``tau_chain`` instead averages over every
    position; where acceptance varies along the text it is the larger: an easy stretch counts
    once per position there, but decoding crosses it in a few forwards and spends most of its
    forwards on the hard stretches.
    """
    tokens = forwards = 0
    for row_starts, row_accepted in zip(starts.tolist(), accepted.tolist()):
        t, n = 0, len(row_starts)
        while t < n:
            if not row_starts[t]:
                t += 1
                continue
            end = t
            while end < n and row_starts[end]:
                end += 1  # rows t..end-1 start chains: end - t answer tokens remain
            step = 1  # the prefill's token: its chain (from the prompt's last row) never runs
            while True:
                tokens, forwards, t = tokens + step, forwards + 1, t + step
                if t >= end:
                    break
                step = min(row_accepted[t] + 1, end - t)
    return tokens, forwards


def tau_chain(chains: list[int], starts: int) -> float:
    """Expected accepted length of a greedy chain of length gamma = len(chains):

        tau = 1 + sum_{i=1..gamma} P(first i draft tokens all accepted)
            = 1 + sum_{i=1..gamma} prod_{j<=i} acc_j,

    where acc_j = P(step j accepted | steps < j accepted) is measured by unrolling the draft j
    steps on validation data (teacher-forced tokens, its own features; see ``chain_counts``) and
    "accepted" means the draft's greedy token equals the target's. The 1 is the target's bonus
    token, so a useless draft has tau = 1, as plain decoding (``decode/tau``'s convention).
    A mean over every position of the text: decoding's τ on the same text is ``replay``'s,
    which equals this only where acceptance does not vary along the text, and is lower
    otherwise.
    """
    return 1.0 + sum(c / max(starts, 1) for c in chains)
