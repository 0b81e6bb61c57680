"""The one seam for dense products (x @ W.T + b) of inference on CPU: a GEMM path per shape;
and the fused fp32 CPU kernels of a decode step (``rms_norm``, ``attend``).

Decoding multiplies a few rows (1 token per row for plain decoding, k tree tokens for a verify
forward) by weights that are far larger than the cache, so each product streams its weight
once and the kernel's small-M behaviour decides the step's cost. The paths:

``packed``      oneDNN weights reordered once into its blocked layout
                (``mkldnn._reorder_linear_weight``) and multiplied by ``mkldnn._linear_pointwise``.
``transposed``  ``x @ Wt`` against a contiguous (in, out) copy of the weight.
``wide``        ``(W @ x.T).T``: the (out, in) weight streamed as the left operand.
``linear``      ``F.linear`` itself: always on CUDA, under autograd, and for dtypes other than
                fp32 (oneDNN has no fast bf16/fp16 kernel on AVX2).
``rows``        our kernel (``cpu_kernels.cpp``, compiled on first use by torch's extension
                builder into ``~/.cache/torch_extensions``, ~35 s on 2 cores; 8 AVX2 lanes, 16
                on AVX-512 CPUs, see ``VECTOR``): parallel over weight rows, bit-identical per
                row for every M.
``compact``     ``rows`` over the weight's exact compact form where it has one (``compact``):
                the default wherever ``rows`` is chosen; forcing ``rows`` streams the fp32
                weight instead.

Compact weights. A GGUF-quantised target dequantised to fp32 (SmolLM2's Q4_1 layers and Q8_0
embedding) holds, per block of 32 weights of a row, only values d * q + m with an fp16 scale d,
a small integer q and an offset m. ``compact`` finds that form from the fp32 weight alone and
keeps it only if it rebuilds every weight bit for bit; the kernels rebuild each block with one
exact product and one rounding, so their products equal the fp32 weight's bit for bit while
streaming 0.625 (Q4_1) or 1.125 (Q8_0) bytes per weight instead of 4. SmolLM2-135M's k = 1
forward: 550 MB of weights to ~100 MB; on the 2-core AVX-512 Xeon the 120 layer linears take
~9 ms at one row instead of ~20 (M = 8: 18 against 31), and ``plain`` decodes ~1.7x faster.
Weights without such a form (a trained draft's) are refused cheaply and keep ``rows``.

The same build holds ``rms_norm`` (``RMSNorm`` in fp32 CPU inference uses it wherever ``rows``
is available): ATen's CPU ``F.rms_norm`` is a composite of small ops that cost ~8-13 ms of a
~65 ms SmolLM2 k = 1 forward (61 norms; interleaved runs with the norms removed).

The default for fp32 (``choose_path``): ``rows`` for up to ``ROWS_MAX`` rows where the CPU has
AVX2 and the kernel builds; otherwise (and above ``ROWS_MAX``) ``transposed`` for a single row
and ``packed`` for two or more. Measured on the 2-core AVX2 EPYC (torch 2.13, 2 threads, the
121 linears of SmolLM2-135M incl. its LM head, median ms over interleaved repeats):

- a quiet machine: M = 1: rows 22.7 / packed 31.6 (transposed ~32); M = 2: 27.0 / 32.5;
  M = 4: 32.3 / 37.3; M = 8: 43.2 / 56.9; M = 16: 68.2 / 77.1. At M = 1 rows streams ~24 GB/s,
  the machine's stream bandwidth; the library paths use one core's (~16 GB/s, the same speed
  at 1 and 2 threads).
- the same machine ~1.6x slower (a busy host), rows / packed: M = 1: 36 / 50; M = 8: 70 / 78;
  M = 16: 102 / 117; M = 32: 170 / 181; M = 64: 303 / 317; M = 128: 602 / 566; hence
  ``ROWS_MAX`` = 64.
- the library paths, earlier: at M = 1 F.linear 42 / transposed 32 / wide 46 / packed 30-37;
  at M = 2-16 ``packed`` is best or within noise of ``wide`` (M = 8: 47 vs 55, M = 16: 57 vs
  65) while ``F.linear`` costs 80-97 ms and ``transposed`` 53-106.

Exactness. Speculative decoding at T=0 must emit plain decoding's tokens, and plain decoding
multiplies 1 row (B rows in a batch) where verification multiplies k (B*k). With the kernels of
``cpu_kernels.cpp`` (fp32, AVX2, up to ``ROWS_MAX`` new tokens per row) every step of a
forward computes each row alone by the same operations: the ``rows`` GEMM, the fused norm,
``attend`` (a masked key adds an exact 0 to each sum), and ATen's elementwise ops (rotary,
SiLU, residuals: one rounding per element). So a verify forward's logits for a tree path equal
plain decoding's bit for bit (``tests/test_modeling.py`` checks it; with SDPA it fails).
Elsewhere exactness rests on argmax gaps: ``packed`` is row-independent for M >= 2 (every M
tried: 1..300, 1 and 2 threads, SmolLM2's shapes and the 49k-row LM head), ``F.linear`` and
``wide`` differ from their 1-row results at every M >= 2, ``transposed`` at M >= 4, the paths
differ from each other (~1e-6 relative), and SDPA over k masked query rows differs from SDPA
over one unmasked row by ~2e-7 per call, so a k-token forward's logits differ from k one-token
forwards by 3-7e-5 (measured on SmolLM2 before these kernels); a near-tie below ~1e-4 could
flip there, and bench runs are checked for it.
Other paths stay selectable (``use_path``, env ``SCYLLA_CPU_GEMM``) for benchmarks.

Derived copies (packed and transposed weights: up to twice the weights' memory besides them)
live in a ``WeightCopies`` next to the module,
keyed by the weight's storage and version counter, so replacing the weight or updating it in
place (an optimiser step) rebuilds them; they are never used when autograd records the product.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from scylla.errors import ConfigError

PATHS = ("packed", "transposed", "wide", "linear", "rows", "compact")

_forced: str | None = os.environ.get("SCYLLA_CPU_GEMM") or None  # checked at first use


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


HAVE_ONEDNN = _onednn_ok()
# the rows kernel is written for AVX2 + FMA (the 2-core EPYC has no AVX-512)
HAVE_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# its vector width: 16 lanes where torch finds AVX-512 (the products of the compact weights,
# rebuilt per block of rows, are compute-bound from a few rows on: the 120 SmolLM2 layer
# linears, 2-core Xeon, median ms, 8 lanes / 16, each with its best block shape: M = 1 9.0 /
# 8.1, M = 4 11.5 / 9.5, M = 8 18.1 / 14.6); 8 lanes elsewhere. SCYLLA_CPU_VECTOR=avx2 keeps 8
# lanes on an AVX-512 CPU (to compare the two builds)
VECTOR = os.environ.get("SCYLLA_CPU_VECTOR") or (
    "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2")
if VECTOR not in ("avx2", "avx512"):
    raise ConfigError(f"SCYLLA_CPU_VECTOR={VECTOR!r}: expected avx2 or avx512")
_VECTOR_FLAGS = {"avx2": ["-mavx2", "-mfma"],
                 "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl",
                            "-mavx512dq", "-DSCYLLA_AVX512"]}
# the most rows the default sends to ``rows``: it beats ``packed`` up to 64, not at 128
ROWS_MAX = 64


@functools.cache
def cpu_model() -> str:
    """This CPU's model name and the vector ISA torch's kernels use on it, e.g.
    ``Intel(R) Xeon(R) Processor (AVX512)``: sessions and CI land on different CPU kinds (an
    AVX2 EPYC, an AVX-512 Xeon), whose timings do not compare, so every measurement names its
    CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else (platform.processor() or platform.machine())
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


@functools.cache
def _source() -> str:
    """The kernels' C++ source, read once: the build and the fingerprint use it."""
    return (Path(__file__).parent / "cpu_kernels.cpp").read_text()


@functools.cache
def _rows_kernel() -> Any:
    """The compiled ``cpu_kernels.cpp``: built once per machine and source (~35 s on 2 cores)
    in torch's extension directory (``TORCH_EXTENSIONS_DIR``), loaded in ~40 ms after that."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(f"scylla_cpu_kernels_{VECTOR}", _source(),
                           functions=["rows_product", "rms_norm", "attend", "layer_step"],
                           extra_cflags=["-O3", *_VECTOR_FLAGS[VECTOR], "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"GEMM path 'rows': could not compile cpu_kernels.cpp (needs a C++ "
                          f"compiler, ninja and the Python headers): {e}") from e


def fingerprint() -> str:
    """What decides this process's CPU kernels (a changed kernel changes measured costs)."""
    return (f"{_forced or 'default'}:{rows_available()}:{VECTOR}:{ROWS_MAX}:"
            f"{hashlib.sha256(_source().encode()).hexdigest()[:12]}")


@functools.cache
def rows_available() -> bool:
    """Whether the default may use ``rows``: AVX2 and a kernel that builds. A failed build
    warns once and leaves the library paths."""
    if not HAVE_AVX2:
        return False
    try:
        _rows_kernel()
    except ConfigError as e:
        warnings.warn(f"{e}; using the oneDNN/MKL paths instead", RuntimeWarning, stacklevel=2)
        return False
    return True


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """Force one CPU inference path (``None``: the default choice) inside the block."""
    global _forced
    if path is not None and path not in PATHS:
        raise ConfigError(f"unknown GEMM path {path!r}; expected one of {', '.join(PATHS)}")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old


def choose_path(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> str:
    """The CPU inference path for a (rows, in) x (in, out) product of ``dtype``.

    fp32: ``rows`` up to ``ROWS_MAX`` rows where it is available, else the transposed copy
    for one row and ``packed`` for more (measured, see the module docstring). Other dtypes: the
    transposed copy for up to 3 rows, else ``F.linear``.
    """
    if _forced is not None:
        if _forced not in PATHS:
            raise ConfigError(f"SCYLLA_CPU_GEMM={_forced!r}: expected one of {', '.join(PATHS)}")
        if _forced in ("rows", "compact"):
            return "rows" if HAVE_AVX2 and dtype == torch.float32 else "linear"
        return _forced if (_forced != "packed" or _packable(dtype)) else "linear"
    if dtype == torch.float32 and rows <= ROWS_MAX and rows_available():
        return "rows"
    if _packable(dtype):
        return "transposed" if rows == 1 else "packed"
    return "transposed" if rows <= 3 else "linear"


def _packable(dtype: torch.dtype) -> bool:
    return HAVE_ONEDNN and dtype == torch.float32


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def _transpose(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


COMPACT_BLOCK = 32  # weights per scale of the compact forms (GGUF's Q4_1 and Q8_0 blocks)
_COMPACT_CHUNK = 4096  # weight rows examined at a time (bounds the temporaries' memory)


@dataclass(frozen=True)
class Compact:
    """A weight's exact compact form: ``w = d * q + m`` per block of ``COMPACT_BLOCK`` weights
    of a row (``affine4``: q in 0..15, two per byte; ``scaled8``: int8 q, no m). d holds fp16
    values, so d * q is exact in fp32 and the sum rounds once, as the weight's own value did:
    the kernels rebuild the fp32 weight bit for bit from 4-6x fewer bytes."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m)
                   if t is not None)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _fp16_near(r: torch.Tensor) -> list[torch.Tensor]:
    """The fp16 values nearest r and their neighbours two steps either way, as fp32 (NaN where
    a step leaves the finite non-negative range)."""
    bits = r.half().view(torch.int16)
    out = []
    for step in (0, 1, -1, 2, -2):
        c = (bits + step).view(torch.float16).float()
        out.append(torch.where(c.isfinite() & (c >= 0), c, torch.full_like(c, float("nan"))))
    return out


def _scaled8(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, d) with b == d * q exactly, or None; b (rows, blocks, COMPACT_BLOCK)."""
    d = b.abs().amax(-1) / 127  # the block's largest weight is d * +-127
    if not _same_bits(d.half().float(), d):
        return None
    q = torch.round(b / d.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp(-127, 127)
    return (q.to(torch.int8), d) if _same_bits(d[..., None] * q, b) else None


def _affine4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, d, m) with b == d * q + m exactly and q in 0..15, or None."""
    m = b.amin(-1)  # the block's smallest weight is q = 0
    span = b - m[..., None]
    q = torch.zeros_like(b)
    d = torch.full_like(m, float("nan"))
    found = torch.zeros_like(m, dtype=torch.bool)
    # d is an fp16 value within rounding of (max - min) / 15 (the largest weight is q = 15)
    for c in _fp16_near(span.amax(-1) / 15):
        qc = torch.nan_to_num(torch.round(span / c[..., None]), nan=0.0).clamp(0, 15)
        qc = torch.where(c[..., None] > 0, qc, torch.zeros_like(qc))
        c0 = torch.nan_to_num(c)
        ok = ~found & (c0[..., None] * qc + m[..., None]).view(torch.int32).eq(
            b.view(torch.int32)).all(-1)
        q[ok], d[ok] = qc[ok], c0[ok]
        found |= ok
    return (q.to(torch.uint8), d, m) if bool(found.all()) else None


def compact(weight: torch.Tensor) -> Compact | None:
    """The exact compact form of an fp32 (out, in) weight, or None when it has none (a trained
    weight; a GGUF-quantised target's dequantised layers and embedding have one)."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % COMPACT_BLOCK or not w.numel():
        return None
    n, k = w.shape
    probe = w[:8].contiguous().view(-1, k // COMPACT_BLOCK, COMPACT_BLOCK)
    if _affine4(probe) is None and _scaled8(probe) is None:  # most weights: rejected cheaply
        return None
    parts: list[tuple[torch.Tensor, ...]] = []
    kind = None
    for start in range(0, n, _COMPACT_CHUNK):
        b = w[start:start + _COMPACT_CHUNK].contiguous().view(-1, k // COMPACT_BLOCK,
                                                              COMPACT_BLOCK)
        for name, fit in (("affine4", _affine4), ("scaled8", _scaled8)):
            if kind in (None, name) and (got := fit(b)) is not None:
                kind = name
                parts.append(got)
                break
        else:
            return None
    if kind == "scaled8":
        return Compact(q=torch.cat([p[0] for p in parts]).view(n, k),
                       d=torch.cat([p[1] for p in parts]), m=None)
    q = torch.cat([p[0] for p in parts]).view(n, k // 16, 2, 8)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2)  # weights j and j + 8
    return Compact(q=packed.contiguous(), d=torch.cat([p[1] for p in parts]),
                   m=torch.cat([p[2] for p in parts]))


_BUILDERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "packed": _pack, "transposed": _transpose, "compact": compact}


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class WeightCopies:
    """Derived layouts of one weight, rebuilt when the weight is replaced or updated in place."""

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple[int, int], Any]] = {}

    def get(self, path: str, weight: torch.Tensor) -> Any:
        key = (weight.data_ptr(), _version(weight))
        hit = self._copies.get(path)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, _BUILDERS[path](weight.detach()))
            self._copies[path] = hit  # a stale copy of this path is dropped here
        return hit[1]

    def clear(self) -> None:
        self._copies = {}


def _compact_for_rows(weight: torch.Tensor, copies: WeightCopies) -> Compact | None:
    """The compact form the ``rows`` path multiplies by (None: the fp32 weight, also when
    ``rows`` is forced)."""
    return copies.get("compact", weight) if _forced != "rows" else None


def streamed_bytes(weight: torch.Tensor, copies: WeightCopies | None) -> int:
    """Bytes a CPU inference product with ``weight`` streams: its compact form's where the
    ``rows`` kernels multiply by one (a decode step's few rows), else the weight's own."""
    if (copies is not None and weight.is_cpu
            and choose_path(1, weight.shape[1], weight.shape[0], weight.dtype) == "rows"):
        c = _compact_for_rows(weight, copies)
        if c is not None:
            return c.nbytes
    return weight.numel() * weight.element_size()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused fp32 RMSNorm of ``cpu_kernels.cpp`` for CPU inference, or None where it does
    not apply (another dtype or device, autograd recording, no kernel)."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or not cpu_inference(x, weight)
            or not rows_available()):
        return None
    return _rows_kernel().rms_norm(x, weight, eps)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of a decode step's few query rows (B, H, R, D) against cache views (B, H, T, D)
    with an additive mask (B, 1, R, T) or None, by ``cpu_kernels.cpp``; None where it does not
    apply (another dtype or device, autograd recording, no kernel)."""
    if (q.dtype != torch.float32 or keys.dtype != torch.float32 or not cpu_inference(q, keys)
            or not rows_available()):
        return None
    empty = q.new_empty(0)
    return _rows_kernel().attend(q, keys, values, empty if mask is None else mask)


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
    if path == "rows":
        y = _rows_kernel().rows_product(x.reshape(rows, in_features),
                                        *_weight_form(weight, copies))
        y = y.reshape(*x.shape[:-1], out_features)
    elif path == "transposed":
        y = torch.matmul(x, copies.get("transposed", weight))
    elif path == "wide":
        y = (weight @ x.reshape(rows, in_features).t()).t().reshape(*x.shape[:-1], out_features)
    else:
        return F.linear(x, weight, bias)
    return y if bias is None else y + bias


_EMPTY = torch.empty(0)


def _weight_form(weight: torch.Tensor, copies: WeightCopies
                 ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight as the ``rows`` kernels take it (``rows_product``): (0, the fp32 weight),
    (1, affine4 q, d, m) or (2, scaled8 q, d)."""
    c = _compact_for_rows(weight, copies)
    if c is None:
        return 0, weight, _EMPTY, _EMPTY
    return (2, c.q, c.d, _EMPTY) if c.m is None else (1, c.q, c.d, c.m)


def _rows_form(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               copies: WeightCopies) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``_weight_form`` for ``LayerStep``; None where ``linear`` would not take the ``rows``
    path (or has a bias)."""
    out_features, in_features = weight.shape
    if (bias is not None or not cpu_inference(x, weight)
            or choose_path(x.numel() // in_features, in_features, out_features,
                           weight.dtype) != "rows"):
        return None
    return _weight_form(weight, copies)
_fused_layers = True


@contextlib.contextmanager
def fused_layers(on: bool) -> Iterator[None]:
    """``on=False``: decoder layers run module by module inside the block (``LayerStep``
    declines), to compare the two."""
    global _fused_layers
    old, _fused_layers = _fused_layers, on
    try:
        yield
    finally:
        _fused_layers = old


# bumped whenever any module registers a parameter or a submodule (a weight replaced, a norm
# swapped): every LayerStep rebuilds its arguments after it
_registrations = 0


def _registered(*_: Any) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


class LayerStep:
    """One decoder layer of a decode step in one call of ``cpu_kernels.cpp`` (``layer_step``):
    the same operations as the layer's modules through ``rms_norm``, ``linear`` and
    ``attend``, so its output is theirs bit for bit.

    ``weights()`` gives the layer's two RMSNorm modules and (weight, bias, WeightCopies) of its
    qkv, o, gate/up and down projections, or None where the layer has other parts. The kernel's
    arguments (the weights' forms) are built from them once and rebuilt only when they may have
    changed: a parameter or submodule registered anywhere, a weight's storage or version, a
    norm's eps, autograd, the forced CPU path, ``fused_layers`` or the row count's path. Building
    them every step cost ~0.8 ms of a 12 ms SmolLM2 forward (2-core Xeon, interleaved runs).
    """

    def __init__(self, weights: Callable[[], Any], n_heads: int):
        self.weights, self.n_heads = weights, n_heads
        self.key: tuple | None = None
        self.norms: tuple[Any, ...] = ()
        self.params: tuple[torch.Tensor, ...] = ()
        self.args: tuple[list[torch.Tensor], list[int], float] | None = None

    def _key(self, x: torch.Tensor) -> tuple:
        rows = x.numel() // x.shape[-1]  # B * K: within ROWS_MAX, so is K
        return (_registrations, _forced, _fused_layers, torch.is_grad_enabled(), x.dtype,
                x.device, x.requires_grad, rows <= ROWS_MAX,
                *[n.eps for n in self.norms], *[(p.data_ptr(), _version(p)) for p in self.params])

    def _build(self, x: torch.Tensor) -> None:
        self.args, self.norms, self.params = None, (), ()
        found = self.weights()
        if found is None:
            return
        norms, linears = found
        self.norms = norms
        self.params = (*[n.weight for n in norms], *[w for w, _, _ in linears])
        if (not _fused_layers or x.dtype != torch.float32 or x.shape[1] > ROWS_MAX
                or not rows_available() or norms[0].eps != norms[1].eps
                or any(n.weight.dtype != torch.float32 or not cpu_inference(x, n.weight)
                       for n in norms)):
            return
        forms = [_rows_form(x, weight, bias, copies) for weight, bias, copies in linears]
        if any(f is None for f in forms):
            return
        tensors = [norms[0].weight, *forms[0][1:], *forms[1][1:], norms[1].weight,
                   *forms[2][1:], *forms[3][1:]]
        self.args = tensors, [f[0] for f in forms], norms[0].eps

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv: tuple[torch.Tensor, torch.Tensor], write_pos: torch.Tensor, key_len: int,
                 mask: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's output for ``x`` (B, K, H) appended at ``write_pos`` (B, K) to the
        layer's cache ``kv``, or None where the modules would not all take these kernels
        (another dtype or device, autograd, a bias, many rows, non-contiguous caches)."""
        key = self._key(x)
        if key != self.key:
            self._build(x)
            self.key = self._key(x)
        k_cache, v_cache = kv
        if self.args is None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        tensors, kinds, eps = self.args
        return _rows_kernel().layer_step(
            x, tensors, kinds, eps, cos, sin, k_cache, v_cache, write_pos, key_len,
            _EMPTY if mask is None else mask, self.n_heads)
