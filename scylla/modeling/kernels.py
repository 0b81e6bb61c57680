"""The one seam for dense products (x @ W.T + b) of inference on CPU: a GEMM path per shape.

Decoding multiplies a few rows (1 token per row for plain decoding, k tree tokens for a verify
forward) by weights that are far larger than the cache, so each product streams its weight
once and the kernel's small-M behaviour decides the step's cost. The paths:

``packed``      oneDNN weights reordered once into its blocked layout
                (``mkldnn._reorder_linear_weight``) and multiplied by ``mkldnn._linear_pointwise``.
``transposed``  ``x @ Wt`` against a contiguous (in, out) copy of the weight.
``wide``        ``(W @ x.T).T``: the (out, in) weight streamed as the left operand.
``linear``      ``F.linear`` itself: always on CUDA, under autograd, and for dtypes other than
                fp32 (oneDNN has no fast bf16/fp16 kernel on AVX2).

Exactness decides the default before speed does. Speculative decoding at T=0 is lossless only
if a verify forward computes each token exactly as plain decoding computes it, and plain decoding
multiplies 1 row (B rows in a batch) where verification multiplies k (B*k). Of the paths above
only ``packed`` is row-independent: row r of an M-row product is bit-identical to that row's
1-row product for every M we tried (1..300, 1 and 2 threads, SmolLM2's shapes and the 49k-row
LM head; ``tests/test_kernels.py`` checks it). ``F.linear`` and ``wide`` differ from their 1-row
result at every M >= 2, ``transposed`` at M >= 4, and mixing two paths by row count breaks it
as well. So fp32 CPU inference uses ``packed`` for every row count: one kernel, rows computed
identically. It is also the fastest or within noise of it at every M measured (see
``PACKED_MEASURED``). Other paths stay selectable (``use_path``, env ``SCYLLA_CPU_GEMM``) for
benchmarks and for comparison.

Derived copies (packed or transposed weights) live in a ``WeightCopies`` next to the module,
keyed by the weight's storage and version counter, so replacing the weight or updating it in
place (an optimiser step) rebuilds them; they are never used when autograd records the product.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

PATHS = ("packed", "transposed", "wide", "linear")

_forced: str | None = os.environ.get("SCYLLA_CPU_GEMM") or None


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


HAVE_ONEDNN = _onednn_ok()


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """Force one CPU inference path (``None``: the default choice) inside the block."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown GEMM path {path!r}; expected one of {PATHS}")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old


def choose_path(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> str:
    """The CPU inference path for a (rows, in) x (in, out) product of ``dtype``.

    fp32: ``packed`` for every shape (row-independent, see the module docstring). Other
    dtypes: the transposed copy for up to 3 rows, else ``F.linear`` (the previous choice).
    """
    if _forced is not None:
        return _forced if (_forced != "packed" or _packable(dtype)) else "linear"
    if _packable(dtype):
        return "packed"
    return "transposed" if rows <= 3 else "linear"


def _packable(dtype: torch.dtype) -> bool:
    return HAVE_ONEDNN and dtype == torch.float32


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def _transpose(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


_BUILDERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "packed": _pack, "transposed": _transpose}


class WeightCopies:
    """Derived layouts of one weight, rebuilt when the weight is replaced or updated in place."""

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def get(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
        hit = self._copies.get(path)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, _BUILDERS[path](weight.detach()))
            self._copies = {path: hit}  # one layout at a time: no stale memory kept
        return hit[1]

    def clear(self) -> None:
        self._copies = {}


def cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU product autograd does not record: its layout may be chosen freely."""
    return weight.is_cpu and x.is_cpu and not (
        torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           copies: WeightCopies) -> torch.Tensor:
    """x (..., in) @ weight(out, in).T + bias through the path ``choose_path`` picks."""
    if not cpu_inference(x, weight):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if rows == 0:
        return F.linear(x, weight, bias)
    path = choose_path(rows, in_features, out_features, weight.dtype)
    if path == "packed":
        return torch.ops.mkldnn._linear_pointwise(x, copies.get("packed", weight), bias,
                                                  "none", [], "")
    if path == "transposed":
        y = torch.matmul(x, copies.get("transposed", weight))
    elif path == "wide":
        y = (weight @ x.reshape(rows, in_features).t()).t().reshape(*x.shape[:-1], out_features)
    else:
        return F.linear(x, weight, bias)
    return y if bias is None else y + bias
