"""What one forward's attention needs, computed once and shared by every layer.

``AttentionStep`` holds the rotary cos/sin of the appended tokens, where their keys/values go in
the cache, how many cached keys to read, and the additive mask. Queries are folded GQA-style:
the ``g`` query heads sharing one key/value head become ``g * K`` query rows of that head, so
attention reads each cached key once (no repeat_kv copies). The mask is therefore laid out as
(B, 1, g*K, T) with row r meaning appended token r % K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scylla.modeling.cache import KVCache
from scylla.modeling.config import ModelConfig
from scylla.modeling.rope import RotaryEmbedding


@dataclass
class AttentionStep:
    cos: torch.Tensor  # (B, K, 1, D)
    sin: torch.Tensor  # (B, K, 1, D), signed for apply_rope
    n_new: int  # K appended tokens
    key_len: int  # T: keys [0, T) are read (from the cache, or the K new ones without cache)
    mask: torch.Tensor | None  # (B, 1, g*K, T) additive float mask, None = all visible
    causal: bool = False  # no cache and default mask: SDPA's own causal path
    write_at: int | None = None  # all rows append at this position (uniform lengths)
    write_pos: torch.Tensor | None = None  # (B, K): where each appended token's entry goes


def _allowed(lengths: torch.Tensor, n_new: int, key_len: int,
             tree_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, K, T) bool: appended token i (at row position lengths[b] + i) may see key t.

    tree_mask (B, K, W + K): its last K columns are the new tokens; its first W columns (the
    window, W >= 0) are the W cached entries just before lengths[b], which a draft growing a
    tree level by level uses for the tree tokens it fed earlier. Older entries are visible.
    """
    device = lengths.device
    rel = torch.arange(key_len, device=device)[None, :] - lengths[:, None]  # (B, T)
    new = torch.arange(n_new, device=device)
    if tree_mask is None:  # causal: cached keys (rel < 0) and new keys j <= i
        return rel[:, None, :] <= new[None, :, None]
    batch, width = lengths.shape[0], tree_mask.shape[-1]
    window = width - n_new
    tree = tree_mask.to(device=device, dtype=torch.bool).expand(batch, n_new, width)
    self_col = torch.arange(width, device=device)[None, :] == new[:, None] + window  # (K, W+K)
    tree = tree | self_col  # a token sees itself
    idx = (rel + window).clamp(0, width - 1)[:, None, :].expand(batch, n_new, key_len)
    in_tree = ((rel >= -window) & (rel < n_new))[:, None, :]
    return (rel < -window)[:, None, :] | (in_tree & tree.gather(2, idx))


def attention_step(config: ModelConfig, rotary: RotaryEmbedding, input_ids: torch.Tensor,
                   cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                   tree_mask: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> AttentionStep:
    """Prepare the attention of appending ``input_ids`` (B, K) to ``cache`` (or, without a
    cache, of a plain forward over the K tokens). See ``LlamaFamilyModel.forward``."""
    batch, n_new = input_ids.shape
    device = input_ids.device
    steps = torch.arange(n_new, device=device)
    if position_ids is None:
        start = cache.lengths[:, None] if cache is not None else torch.zeros(
            batch, 1, dtype=torch.long, device=device)
        position_ids = start + steps[None, :]
    position_ids = position_ids.to(device).expand(batch, n_new)
    cos, sin = rotary(position_ids, dtype)
    groups = config.kv_groups

    if cache is None:
        if tree_mask is None:
            return AttentionStep(cos, sin, n_new, n_new, None, causal=n_new > 1)
        zero = torch.zeros(batch, dtype=torch.long, device=device)
        allowed = _allowed(zero, n_new, n_new, tree_mask)
    else:
        cache.check_room(n_new)
        key_len = cache.max_length + n_new
        write_at = cache.max_length if cache.uniform else None
        pos = cache.lengths[:, None] + steps[None, :]  # (B, K)
        if cache.uniform and n_new == 1 and tree_mask is None:
            return AttentionStep(cos, sin, n_new, key_len, None, write_at=write_at, write_pos=pos)
        allowed = _allowed(cache.lengths, n_new, key_len, tree_mask)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # finite: never NaN in any dtype
    mask = mask[:, None].repeat(1, 1, groups, 1)  # (B, 1, g*K, T)
    if cache is None:
        return AttentionStep(cos, sin, n_new, n_new, mask)
    return AttentionStep(cos, sin, n_new, key_len, mask, write_at=write_at, write_pos=pos)
