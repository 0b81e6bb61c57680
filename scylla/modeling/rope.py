"""Rotary position embeddings with the scaling variants Llama-family checkpoints use.

Inverse frequencies follow transformers' ``modeling_rope_utils`` (the reference our tests compare
with): default, linear, dynamic (NTK), llama3 and yarn. ``dynamic`` is computed from the largest
position of each forward (HF keeps state across calls; both agree within the context window).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scylla.errors import TargetError
from scylla.modeling.config import ModelConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (theta ** exponents)  # (dim/2,)


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any], max_pos: int) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p.get("original_max_position_embeddings", max_pos)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    original = p.get("original_max_position_embeddings", max_pos)
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1 - ramp
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, float(attention_factor)


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) in fp32, scale applied to cos/sin)."""
    p = config.rope_scaling or {"rope_type": "default"}
    kind, theta, dim = p["rope_type"], config.rope_theta, config.head_dim
    max_pos = config.max_position_embeddings
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, dim) / p["factor"], 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or max_pos, max_pos)
        factor = p["factor"]
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(theta, dim), p, max_pos), 1.0
    if kind == "yarn":
        return _yarn(theta, dim, p, max_pos)
    raise TargetError(f"rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Maps position ids (B, K) to cos and signed sin (B, K, 1, D) for ``apply_rope``.

    The inverse frequencies stay fp32 and outside the module's buffers, so ``model.to(bf16)``
    cannot round them; they are copied to each device on first use.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dynamic = (config.rope_scaling or {}).get("rope_type") == "dynamic"
        inv_freq, self.scale = rope_inv_freq(config)
        self._inv_freq = {inv_freq.device: inv_freq}

    def _inv_freq_on(self, device: torch.device, position_ids: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                return rope_inv_freq(self.config, seq_len)[0].to(device)
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq_on(position_ids.device, position_ids)
        freqs = position_ids[..., None].float() * inv_freq  # (B, K, D/2), fp32 as in HF
        cos, sin = freqs.cos(), freqs.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]: one roll instead of slice+cat
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]  # (B, K, 1, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, K, heads, D) rotated by cos / signed sin (B, K, 1, D)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
