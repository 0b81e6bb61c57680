"""A measured roofline for this machine, and the bytes and FLOPs of one k-token forward.

A forward of k new tokens cannot run faster than the larger of its two floors: the bytes it
must stream from memory (every weight once, plus the cached keys and values it reads) divided
by the machine's stream bandwidth, and the FLOPs it performs divided by the machine's GEMM peak.
Both rates are measured here rather than taken from a data sheet, with the threads torch uses.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from scylla.modeling import kernels

STREAM_BYTES = 256 << 20  # 8x a 32 MiB L3: the sum streams from DRAM
GEMM_SIZE = 2048  # fp32 square matmul: 17 GFLOP, past the sizes where MKL is still ramping up


@dataclass(frozen=True)
class Roofline:
    bandwidth: float  # bytes/s, reading a large fp32 tensor (the faster of x.sum() and a GEMV)
    copy_bandwidth: float  # bytes/s moved (read + write) by a large tensor copy
    gemm_peak: float  # FLOP/s of a large fp32 matmul

    def as_dict(self) -> dict[str, float]:
        return {"bandwidth_gbs": self.bandwidth / 1e9, "copy_bandwidth_gbs":
                self.copy_bandwidth / 1e9, "gemm_gflops": self.gemm_peak / 1e9}


def _median_s(run: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``run`` after one warm-up (the machine may be shared: no minimum)."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stream_bandwidth(nbytes: int = STREAM_BYTES, repeats: int = 7) -> tuple[float, float]:
    """(read bytes/s, moved bytes/s of ``y.copy_(x)``) on an fp32 tensor of ``nbytes``.

    The read rate is the faster of ``x.sum()`` and a matrix-vector product over x viewed as
    (n, 4096): the GEMV is how decoding reads its weights, and measured 22 GB/s against 17 for
    the sum on the 2-core EPYC this was written on."""
    x = torch.rand(nbytes // 4)
    y = torch.empty_like(x)
    rows, vec = x.view(-1, 4096), torch.rand(4096)
    read = nbytes / min(_median_s(x.sum, repeats), _median_s(lambda: torch.mv(rows, vec), repeats))
    copy = 2 * nbytes / _median_s(lambda: y.copy_(x), repeats)
    return read, copy


def gemm_peak(n: int = GEMM_SIZE, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) fp32 matmul."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    out = torch.empty(n, n)
    return 2 * n ** 3 / _median_s(lambda: torch.mm(a, b, out=out), repeats)


@torch.inference_mode()
def measure_roofline() -> Roofline:
    read, copy = stream_bandwidth()
    return Roofline(read, copy, gemm_peak())


def _linears(model: nn.Module) -> dict[int, nn.Linear]:
    """The linears whose 2-D weights every forward streams, by weight: each distinct weight
    once (a tied head counts once) and without the embedding table, of which a forward reads
    only k rows."""
    seen: dict[int, nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and getattr(module, "weight", None) is not None:
            seen.setdefault(module.weight.data_ptr(), module)
    return seen


def _streamed(model: nn.Module) -> dict[int, int]:
    """Bytes per forward of each distinct linear weight: its compact exact form's where the CPU
    kernels multiply by that (``kernels.streamed_bytes``), else its own."""
    return {ptr: kernels.streamed_bytes(m.weight, getattr(m, "_copies", None))
            for ptr, m in _linears(model).items()}


def forward_bytes(model: nn.Module, k: int, context: int) -> int:
    """Bytes a k-token forward on a ``context``-token cache (batch 1) must move: every linear
    weight (as the kernels store it), norm weight and bias once, k embedding rows, and each
    layer's keys and values for context + k positions read (k of them written)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    embed = model.embed_tokens.weight
    linear = _streamed(model)
    total = 0
    for ptr, p in params.items():
        if ptr == embed.data_ptr() and ptr not in linear:
            total += k * p.shape[1] * p.element_size()  # only the looked-up rows
        else:
            total += linear.get(ptr, p.numel() * p.element_size())
    c = model.config
    kv_row = 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize  # K and V, 1 layer
    total += c.num_hidden_layers * kv_row * (context + 2 * k)  # read context + k, write k
    return total


def forward_flops(model: nn.Module, k: int, context: int) -> int:
    """FLOPs of a k-token forward on a ``context``-token cache: 2 per weight element per row
    for every linear (the LM head included), and q.k plus p.v over context + k keys per head."""
    dense = sum(2 * k * m.weight.numel() for m in _linears(model).values())
    c = model.config
    attn = c.num_hidden_layers * c.num_attention_heads * 4 * k * (context + k) * c.head_dim
    return dense + attn


def floors_ms(model: nn.Module, k: int, context: int, roof: Roofline) -> dict[str, float]:
    """The forward's bytes and FLOPs and the milliseconds each allows at the measured rates."""
    nbytes, flops = forward_bytes(model, k, context), forward_flops(model, k, context)
    return {"bytes": nbytes, "flops": flops, "bw_floor_ms": nbytes / roof.bandwidth * 1e3,
            "flop_floor_ms": flops / roof.gemm_peak * 1e3}
