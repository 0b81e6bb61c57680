"""The CPU GEMM seam (scylla.modeling.kernels): every path equals F.linear, packed rows are
row-independent, autograd falls back to F.linear, and derived copies follow the weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scylla.modeling import kernels
from scylla.modeling.layers import Linear, LMHead

ROWS = [1, 2, 3, 4, 5, 8, 13, 16, 17, 40]


@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_path_equals_f_linear_for_every_row_count(path, bias):
    torch.manual_seed(0)
    lin = Linear(48, 80, bias=bias)
    for rows in ROWS:
        x = torch.randn(1, rows, 48)
        with torch.inference_mode(), kernels.use_path(path):
            y = lin(x)
        assert y.shape == (1, rows, 80)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", kernels.PATHS)
def test_batched_and_strided_inputs(path):
    torch.manual_seed(1)
    head = LMHead(32, 300, bias=False)
    x = torch.randn(3, 5, 64)[..., ::2]  # (3, 5, 32), not contiguous
    with torch.inference_mode(), kernels.use_path(path):
        y = head(x)
    torch.testing.assert_close(y, F.linear(x, head.weight), atol=1e-5, rtol=1e-5)
    with torch.inference_mode(), kernels.use_path(path):  # no rows at all
        assert head(torch.randn(0, 1, 32)).shape == (0, 1, 300)


ROW_INDEPENDENT = [  # (path, the fewest rows from which it is row-independent)
    pytest.param("packed", 2, marks=pytest.mark.skipif(not kernels.HAVE_ONEDNN,
                                                       reason="oneDNN not built into this torch")),
    pytest.param("rows", 1, marks=pytest.mark.skipif(not kernels.HAVE_AVX2,
                                                     reason="the rows kernel needs AVX2"))]


@pytest.mark.parametrize("path, fewest", ROW_INDEPENDENT)
@pytest.mark.parametrize("shape", [(64, 96), (577, 960), (1536, 576), (576, 49151)])
def test_row_independent_paths_compute_each_row_alike_for_every_row_count(path, fewest, shape):
    """What keeps a verify forward's linears token-exact against plain decoding's (odd K and N
    included: the kernels' tails)."""
    in_f, out_f = shape
    torch.manual_seed(2)
    lin = Linear(in_f, out_f, bias=True)
    x = torch.randn(40, in_f)
    with torch.inference_mode(), kernels.use_path(path):
        alone = lin(x) if fewest > 1 else torch.cat([lin(x[r:r + 1]) for r in range(40)])
        for rows in [r for r in ROWS if r >= fewest]:
            assert torch.equal(lin(x[:rows]), alone[:rows]), rows
            assert torch.equal(lin(x[:rows].view(1, rows, in_f))[0], alone[:rows]), rows
    torch.testing.assert_close(alone, F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-5)


def test_default_path_per_row_count_and_dtype():
    rows = "rows" if kernels.rows_available() else None
    if kernels.HAVE_ONEDNN:
        assert kernels.choose_path(1, 576, 960, torch.float32) == rows or "transposed"
        assert kernels.choose_path(2, 576, 960, torch.float32) == rows or "packed"
        assert kernels.choose_path(kernels.ROWS_MAX, 576, 49152, torch.float32) == rows or "packed"
        assert kernels.choose_path(kernels.ROWS_MAX + 1, 576, 960, torch.float32) == "packed"
    assert kernels.choose_path(2, 576, 960, torch.bfloat16) == "transposed"
    assert kernels.choose_path(8, 576, 960, torch.bfloat16) == "linear"
    with kernels.use_path("wide"):
        assert kernels.choose_path(1, 8, 8, torch.float32) == "wide"
    with pytest.raises(ValueError, match="unknown GEMM path"):
        with kernels.use_path("fast"):
            pass


@pytest.mark.parametrize("path", ["packed", "transposed"])
def test_a_weight_update_rebuilds_the_copy(path):
    torch.manual_seed(3)
    lin = Linear(16, 24)
    x = torch.randn(2, 16)
    with kernels.use_path(path):
        with torch.inference_mode():
            lin(x)
        first = lin._copies.get(path, lin.weight)
        with torch.no_grad():
            lin.weight.mul_(2.0)  # in place, as an optimiser step
        with torch.inference_mode():
            y = lin(x)
        assert lin._copies.get(path, lin.weight) is not first
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
        lin.weight = torch.nn.Parameter(torch.randn(24, 16))  # replaced
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
        lin.release_weight_copies()
        assert not lin._copies._copies


def test_autograd_falls_back_to_f_linear_and_builds_no_copy():
    torch.manual_seed(4)
    lin = Linear(8, 6)
    x = torch.randn(3, 8, requires_grad=True)
    lin(x).sum().backward()  # trainable weight
    torch.testing.assert_close(lin.weight.grad, x.detach().sum(0).expand(6, 8))
    lin.requires_grad_(False)  # frozen layer, gradient to the input (a draft through a head)
    x.grad = None
    y = lin(x)
    assert y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 8))
    assert not lin._copies._copies
    with torch.no_grad(), kernels.use_path("transposed"):  # no autograd recording: the seam's
        lin(x)
    assert lin._copies._copies



def test_a_kernel_that_does_not_build_warns_once_and_leaves_the_library_paths(monkeypatch):
    def broken():
        raise kernels.ConfigError("GEMM path 'rows': could not compile cpu_kernels.cpp (no g++)")

    monkeypatch.setattr(kernels, "_rows_kernel", broken)
    monkeypatch.setattr(kernels, "HAVE_AVX2", True)
    kernels.rows_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no g\\+\\+.*oneDNN/MKL paths instead"):
            assert not kernels.rows_available()
        assert kernels.choose_path(4, 8, 8, torch.float32) in ("packed", "linear")
        lin = Linear(8, 6)
        with torch.inference_mode():
            torch.testing.assert_close(lin(torch.ones(4, 8)), F.linear(torch.ones(4, 8),
                                                                      lin.weight, lin.bias))
    finally:
        kernels.rows_available.cache_clear()


@pytest.mark.skipif(not kernels.HAVE_AVX2, reason="the CPU kernels need AVX2")
@pytest.mark.parametrize("dim", [64, 20])  # the head width kept in registers, and any other
def test_fused_norm_and_attention_match_aten_and_compute_each_row_alone(dim):
    torch.manual_seed(5)
    x, w = torch.randn(2, 7, 577), torch.randn(577)  # odd width: the scalar tail
    q, cache_k, cache_v = torch.randn(2, 3, 12, dim), torch.randn(2, 3, 64, dim), torch.randn(
        2, 3, 64, dim)
    keys, values = cache_k.narrow(2, 0, 40), cache_v.narrow(2, 0, 40)  # cache views
    mask = torch.zeros(2, 1, 12, 40).masked_fill_(torch.rand(2, 1, 12, 40) < 0.3, -3.0e38)
    mask[..., 0] = 0.0  # every row sees one key at least
    with torch.inference_mode():
        norm = kernels.rms_norm(x, w, 1e-5)
        torch.testing.assert_close(norm, F.rms_norm(x, (577,), w, 1e-5))
        assert torch.equal(torch.cat([kernels.rms_norm(x[:, i:i + 1], w, 1e-5)
                                      for i in range(7)], 1), norm)
        for m in (mask, None):
            out = kernels.attend(q, keys, values, m)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(
                q, keys, values, attn_mask=m), atol=1e-6, rtol=1e-5)
            alone = [kernels.attend(q[:, :, r:r + 1], keys, values,
                                    None if m is None else m[:, :, r:r + 1]) for r in range(12)]
            assert torch.equal(torch.cat(alone, 2), out)
        # keys masked after a row's last visible one (a shorter row of a batch, later tree
        # nodes) leave its bits as on a cache cut there
        cut = mask.clone()
        cut[..., 25:] = -3.0e38
        assert torch.equal(kernels.attend(q, keys, values, cut), kernels.attend(
            q, keys.narrow(2, 0, 25), values.narrow(2, 0, 25), cut[..., :25].contiguous()))
    x.requires_grad_(True)  # autograd records: ATen's ops, not the kernels
    assert kernels.rms_norm(x, w, 1e-5) is None
    assert kernels.attend(q.requires_grad_(True), keys, values, None) is None


def test_every_run_names_its_cpu_and_the_vector_isa_torch_uses_on_it():
    from scylla.pipeline import machine

    isa = torch.backends.cpu.get_cpu_capability()
    assert kernels.cpu_model().endswith(f"({isa})")
    assert kernels.cpu_model() in machine.description()


def gguf_like(out_f: int, in_f: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """An fp32 weight as a GGUF-quantised target's dequantised one: per block of 32 weights of
    a row, fp16 scale d times q (Q8_0: int8 q) or plus an fp16 minimum m (Q4_1: q in 0..15)."""
    blocks = (out_f, in_f // 32)
    d = (torch.rand(*blocks, generator=gen) * 0.02).half().float()
    if kind == "scaled8":
        q = torch.randint(-127, 128, (*blocks, 32), generator=gen).float()
        q[..., 0] = 127  # the block's largest magnitude, as llama.cpp scales it
        return (d[..., None] * q).view(out_f, in_f)
    m = (torch.randn(*blocks, generator=gen) * 0.05).half().float()
    q = torch.randint(0, 16, (*blocks, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15  # the block's minimum and maximum
    return (d[..., None] * q + m[..., None]).view(out_f, in_f)


@pytest.mark.skipif(not kernels.HAVE_AVX2, reason="the CPU kernels need AVX2")
@pytest.mark.parametrize("kind", ["affine4", "scaled8"])
@pytest.mark.parametrize("shape", [(64, 96), (576, 960), (1536, 576)])
def test_compact_weights_multiply_bit_for_bit_as_their_fp32_values(kind, shape):
    """A GGUF target's layers (Q4_1) and embedding (Q8_0) stream as 4- and 8-bit integers with
    per-block scales, rebuilt exactly: every row count's products equal the fp32 weight's bit for
    bit, row by row, so plain decoding and verification stay exact while reading 4-6x fewer
    bytes."""
    if not kernels.rows_available():
        pytest.skip("the CPU kernels did not build")
    in_f, out_f = shape
    gen = torch.Generator().manual_seed(7)
    lin = Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(gguf_like(out_f, in_f, kind, gen))
    c = kernels.compact(lin.weight)
    assert c is not None and (c.m is None) == (kind == "scaled8")
    assert c.nbytes * (3 if kind == "scaled8" else 5) < lin.weight.numel() * 4
    x = torch.randn(40, in_f, generator=gen)
    with torch.inference_mode():
        with kernels.use_path("rows"):  # the fp32 weight itself
            dense = lin(x)
        with kernels.use_path("compact"):
            alone = torch.cat([lin(x[r:r + 1]) for r in range(40)])
            for rows in ROWS:
                assert torch.equal(lin(x[:rows]).view(torch.int32),
                                   dense[:rows].view(torch.int32)), rows
                assert torch.equal(lin(x[:rows]), alone[:rows]), rows
    assert kernels.streamed_bytes(lin.weight, lin._copies) == c.nbytes
    with kernels.use_path("rows"):
        assert kernels.streamed_bytes(lin.weight, lin._copies) == lin.weight.numel() * 4


def test_weights_without_an_exact_compact_form_keep_their_fp32_bytes():
    gen = torch.Generator().manual_seed(8)
    assert kernels.compact(torch.randn(64, 96, generator=gen)) is None  # a trained weight
    assert kernels.compact(gguf_like(64, 96, "affine4", gen)[:, :80]) is None  # K % 32 != 0
    w = gguf_like(4200, 64, "affine4", gen)  # more rows than one examined chunk
    assert kernels.compact(w) is not None
    w[4100, 3] += 1e-3  # one weight off the grid, past the first chunk
    assert kernels.compact(w) is None
    lin = Linear(96, 64)
    assert kernels.streamed_bytes(lin.weight, lin._copies) == 64 * 96 * 4
