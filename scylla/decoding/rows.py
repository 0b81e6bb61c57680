"""Moving batch rows between KV caches (continuous batching refills a finished row's slot)."""
from __future__ import annotations

from typing import Any

import torch


def put_cache_rows(dst: Any, rows: torch.Tensor, src: Any) -> None:
    """Row rows[i] of ``dst`` becomes row i of ``src`` (entries up to src's longest row)."""
    n = src.max_length
    dst.k[:, rows, :, :n] = src.k[:, :, :, :n]
    dst.v[:, rows, :, :n] = src.v[:, :, :, :n]
    lengths = dst.lengths.clone()
    lengths[rows] = src.lengths
    dst.set_lengths(lengths)
