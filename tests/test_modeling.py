"""Our forward against HF transformers, and the cache operations speculative decoding needs."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from scylla.errors import TargetError
from scylla.modeling import LlamaFamilyModel, ModelConfig, kernels

ATOL = 1e-4
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            # a larger init than HF's 0.02 so logits spread over several units and a wrong
            # rotation or mask shows far above the tolerance
            initializer_range=0.15)
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 32},
}


def tiny_hf(kind: str = "llama", rope: str = "default", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if ROPES[rope] is not None:
        kwargs["rope_parameters"] = dict(ROPES[rope])
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kwargs)).eval()
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def ours_of(hf) -> LlamaFamilyModel:
    return LlamaFamilyModel.from_hf(hf)


CASES = [("llama", r) for r in ROPES] + [("qwen2", "default"), ("qwen2", "yarn")]


@pytest.mark.parametrize("kind,rope", CASES)
@torch.inference_mode()
def test_logits_and_hidden_states_equal_hf(kind, rope):
    hf = tiny_hf(kind, rope)
    model = ours_of(hf)
    assert model.config.rope_scaling is None or model.config.rope_scaling["rope_type"] == rope
    ids = torch.randint(0, 256, (2, 40))
    ref = hf(ids, output_hidden_states=True)
    out = model(ids, hidden_layers=(0, 1, 2))
    assert ref.logits.std() > 0.5  # the check below is meaningful
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[0], ref.hidden_states[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[1], ref.hidden_states[1], atol=ATOL, rtol=0)
    # HF's last hidden state is after the final norm; ours keeps that in last_hidden
    torch.testing.assert_close(out.last_hidden, ref.hidden_states[2], atol=ATOL, rtol=0)
    assert not torch.allclose(out.hidden[2], out.last_hidden)


@pytest.mark.parametrize("kind,rope", [("llama", "llama3"), ("qwen2", "default")])
@torch.inference_mode()
def test_cached_chunks_equal_hf(kind, rope):
    hf = tiny_hf(kind, rope)
    model = ours_of(hf)
    ids = torch.randint(0, 256, (3, 30))
    ref = hf(ids).logits
    cache = model.new_cache(3, 64)
    chunks = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 17), (17, 18), (18, 30)]]
    torch.testing.assert_close(torch.cat(chunks, 1), ref, atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [30, 30, 30] and cache.max_length == 30


@torch.inference_mode()
def test_gqa_one_group_and_mha_equal_hf():
    for kv_heads in (1, 4):
        hf = tiny_hf(num_key_value_heads=kv_heads)
        ids = torch.randint(0, 256, (1, 12))
        torch.testing.assert_close(ours_of(hf)(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def random_tree(n: int, gen: torch.Generator) -> list[int]:
    """parent[i] < i (or -1 for children of the cached prefix)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def tree_paths(parent: list[int]) -> list[list[int]]:
    leaves = set(range(len(parent))) - set(parent)
    paths = []
    for leaf in sorted(leaves):
        path, node = [], leaf
        while node != -1:
            path.append(node)
            node = parent[node]
        paths.append(path[::-1])
    return paths


def tree_mask_of(parent: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(parent)
    mask, depth = torch.zeros(n, n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        node = i
        while node != -1:
            mask[i, node] = True
            node = parent[node]
        depth[i] = int(mask[i].sum()) - 1
    return mask, depth


def append_random_trees(model, gen, prefix_lens: torch.Tensor, n: int):
    """Prefill random prompts cut to ``prefix_lens``, then append one random n-node tree per
    row in one forward; returns prompts, parents, tree tokens, the cache and the logits."""
    batch, width = len(prefix_lens), int(prefix_lens.max())
    prompts = torch.randint(0, 256, (batch, width), generator=gen)
    parents = [random_tree(n, gen) for _ in range(batch)]
    masks, depths = zip(*(tree_mask_of(p) for p in parents))
    tokens = torch.randint(0, 256, (batch, n), generator=gen)
    cache = model.new_cache(batch, 64)
    model(prompts, cache=cache)
    cache.set_lengths(prefix_lens)
    out = model(tokens, cache=cache, position_ids=prefix_lens[:, None] + torch.stack(depths),
                tree_mask=torch.stack(masks)).logits  # (B, n, V)
    return prompts, parents, tokens, cache, out


@torch.inference_mode()
def test_tree_append_equals_each_path_alone():
    gen = torch.Generator().manual_seed(1)
    model = ours_of(tiny_hf("qwen2", "default"))
    prefix_lens = torch.tensor([9, 6])  # rows of different lengths in one batch
    n = 10
    prompts, parents, tokens, cache, out = append_random_trees(model, gen, prefix_lens, n)
    assert cache.lengths.tolist() == [9 + n, 6 + n]
    for b in range(2):
        for path in tree_paths(parents[b]):
            seq = torch.cat([prompts[b, : prefix_lens[b]], tokens[b, path]])[None]
            alone = model(seq).logits[0, prefix_lens[b]:]
            torch.testing.assert_close(out[b, path], alone, atol=ATOL, rtol=0)


def gguf_grid(model: LlamaFamilyModel) -> LlamaFamilyModel:
    """The model's weights rounded as a GGUF file stores them (llama.cpp's rules): Q8_0 for the
    embedding (w = d * q, int8 q), Q4_1 for the layers (w = d * q + m, q in 0..15), fp16 d and m
    per 32 weights of a row; dequantised to fp32 as a converted GGUF target is."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            b = p.view(p.shape[0], -1, 32)
            if "embed" in name or "lm_head" in name:
                d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
                p.copy_((d * torch.round(b / d).clamp(-127, 127)).view_as(p))
            else:
                m = b.amin(-1, keepdim=True).half().float()
                d = ((b.amax(-1, keepdim=True) - m) / 15).half().float()
                p.copy_((d * torch.round((b - m) / d).clamp(0, 15) + m).view_as(p))
    return model


@pytest.mark.skipif(not kernels.HAVE_AVX2, reason="the CPU kernels need AVX2")
@pytest.mark.parametrize("kind, weights", [("llama", "fp32"), ("qwen2", "fp32"),
                                           ("llama", "gguf")])
@torch.inference_mode()
def test_a_tree_verify_forward_computes_each_path_as_plain_decoding_does_bit_for_bit(kind,
                                                                                   weights):
    """fp32 CPU: the rows GEMM, the fused norm and the decode-step attention compute every row
    alone, so verification's logits are plain decoding's, not merely close (T=0 exactness does
    not rest on argmax gaps). A GGUF-quantised target's weights stream in their compact form."""
    if not kernels.rows_available():
        pytest.skip("the CPU kernels did not build")
    gen = torch.Generator().manual_seed(5)
    model = ours_of(tiny_hf(kind, "default"))
    if weights == "gguf":
        gguf_grid(model)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(kernels.compact(m.weight) is not None for m in linears)
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        streamed = model(ids).logits
        with kernels.use_path("rows"):  # the fp32 weights themselves: the same bits
            assert torch.equal(model(ids).logits, streamed)
    prefix_lens = torch.tensor([9, 6])
    prompts, parents, tokens, _, out = append_random_trees(model, gen, prefix_lens, 10)
    for b in range(2):
        for path in tree_paths(parents[b]):
            cache = model.new_cache(1, 64)
            model(prompts[b:b + 1, :prefix_lens[b]], cache=cache)
            for node in path:
                step = model(tokens[b:b + 1, node:node + 1], cache=cache).logits[0, 0]
                assert torch.equal(step, out[b, node]), (b, path, node)


@pytest.mark.skipif(not kernels.HAVE_AVX2, reason="the CPU kernels need AVX2")
@pytest.mark.parametrize("weights", ["fp32", "gguf"])
@torch.inference_mode()
def test_a_fused_decode_layer_computes_what_the_layers_modules_do_bit_for_bit(monkeypatch,
                                                                              weights):
    """A decode step's decoder layer in one kernel call (``kernels.LayerStep``) gives the
    logits and cache entries of the same layer run module by module, bit for bit: a tree
    appended to rows of different lengths (a mask, per-row cache positions), then 1-token
    steps of a uniform batch."""
    if not kernels.rows_available():
        pytest.skip("the CPU kernels did not build")
    calls = []
    fused = kernels.LayerStep.__call__
    monkeypatch.setattr(kernels.LayerStep, "__call__",
                        lambda *a, **k: calls.append(fused(*a, **k)) or calls[-1])
    model = ours_of(tiny_hf("llama", "default"))
    if weights == "gguf":
        gguf_grid(model)
    results = []
    for on in (True, False):
        gen = torch.Generator().manual_seed(7)
        with kernels.fused_layers(on):
            _, _, _, cache, out = append_random_trees(model, gen, torch.tensor([9, 6]), 10)
            cache.set_lengths([19, 19])
            steps = [model(torch.randint(0, 256, (2, 1), generator=gen), cache=cache).logits
                     for _ in range(3)]
        results.append((out, steps, cache.k, cache.v))
    assert calls and all(c is not None for c in calls[:len(calls) // 2])  # fused, then not
    assert all(c is None for c in calls[len(calls) // 2:])
    (out, steps, k, v), (out2, steps2, k2, v2) = results
    assert torch.equal(out, out2) and torch.equal(k, k2) and torch.equal(v, v2)
    assert all(torch.equal(a, b) for a, b in zip(steps, steps2))


@pytest.mark.skipif(not kernels.HAVE_AVX2, reason="the CPU kernels need AVX2")
def test_a_fused_layers_kept_arguments_follow_its_weights():
    """``LayerStep`` builds its kernel arguments once; a weight updated in place, a parameter
    replaced, or a norm swapped for another module is what the next decode step computes with,
    as the modules would."""
    if not kernels.rows_available():
        pytest.skip("the CPU kernels did not build")
    model = gguf_grid(ours_of(tiny_hf("llama", "default")))  # compact forms: copies to rebuild
    gen = torch.Generator().manual_seed(5)
    prompt, nxt = torch.randint(0, 256, (2, 6), generator=gen), torch.randint(0, 256, (2, 1))

    def step(on: bool) -> torch.Tensor:
        with torch.inference_mode(), kernels.fused_layers(on):
            cache = model.new_cache(2, 16)
            model(prompt, cache=cache)
            return model(nxt, cache=cache).logits

    layer = model.layers[0]
    first = step(True)  # builds the arguments; each change below comes after a fused step
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(0.5)  # in place: a new version
    second = step(True)
    assert not torch.equal(second, first) and torch.equal(second, step(False))
    step(True)
    layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight * 2)
    third = step(True)
    assert not torch.equal(third, second) and torch.equal(third, step(False))
    step(True)
    layer.post_attention_layernorm.eps = 1e-2  # the two norms' eps now differ: modules only
    fourth = step(True)
    assert not torch.equal(fourth, third) and torch.equal(fourth, step(False))
    step(True)
    layer.input_layernorm = torch.nn.Identity()  # a served EAGLE first layer's shape
    calls = []
    fused = kernels.LayerStep.__call__
    try:
        kernels.LayerStep.__call__ = lambda *a, **k: calls.append(fused(*a, **k)) or calls[-1]
        fifth = step(True)
    finally:
        kernels.LayerStep.__call__ = fused
    assert not torch.equal(fifth, fourth) and torch.equal(fifth, step(False))
    n = len(model.layers)  # the fused run: its prefill, then its step, layer by layer
    assert calls[0] is None and calls[n] is None  # layer 0 declines
    assert calls[1] is not None and calls[n + 1] is not None  # layer 1 still fuses


@torch.inference_mode()
def test_keep_equals_recompute_from_scratch():
    gen = torch.Generator().manual_seed(2)
    model = ours_of(tiny_hf("llama", "linear"))
    prefix_lens = torch.tensor([8, 5, 7])
    prompts, parents, tokens, cache, _ = append_random_trees(model, gen, prefix_lens, 9)
    # row 0 keeps its longest path, row 1 nothing, row 2 a path of one node
    kept = [max(tree_paths(parents[0]), key=len), [], tree_paths(parents[2])[0][:1]]
    width = max(len(k) for k in kept)
    keep_idx = torch.tensor([k + [0] * (width - len(k)) for k in kept])
    cache.keep(prefix_lens, keep_idx, torch.tensor([len(k) for k in kept]))
    assert cache.lengths.tolist() == [8 + len(kept[0]), 5, 8]
    nxt = torch.randint(0, 256, (3, 2), generator=gen)
    out = model(nxt, cache=cache).logits
    for b in range(3):
        seq = torch.cat([prompts[b, : prefix_lens[b]], tokens[b, kept[b]], nxt[b]])[None]
        torch.testing.assert_close(out[b], model(seq).logits[0, -2:], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_per_row_lengths_equal_each_row_alone_and_select():
    gen = torch.Generator().manual_seed(3)
    model = ours_of(tiny_hf("llama", "default"))
    lens = [11, 4, 7]
    prompts = torch.randint(0, 256, (3, 11), generator=gen)
    steps = torch.randint(0, 256, (3, 4), generator=gen)
    cache = model.new_cache(3, 32)
    model(prompts, cache=cache)
    cache.set_lengths(lens)
    assert not cache.uniform and cache.max_length == 11
    batched = torch.cat([model(steps[:, t: t + 1], cache=cache).logits for t in range(4)], 1)
    for b, n in enumerate(lens):
        alone = model(torch.cat([prompts[b, :n], steps[b]])[None]).logits[0, n:]
        torch.testing.assert_close(batched[b], alone, atol=ATOL, rtol=0)
    # dropping a row keeps the others' entries
    sub = cache.select([2, 0])
    assert sub.lengths.tolist() == [lens[2] + 4, lens[0] + 4] and sub.batch_size == 2
    extra = torch.randint(0, 256, (2, 1), generator=gen)
    got = model(extra, cache=sub).logits[:, 0]
    for r, b in enumerate([2, 0]):
        seq = torch.cat([prompts[b, : lens[b]], steps[b], extra[r]])[None]
        torch.testing.assert_close(got[r], model(seq).logits[0, -1], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_bf16_forward_is_sane():
    hf = tiny_hf("llama", "llama3")
    model = ours_of(hf).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 24))
    cache = model.new_cache(2, 32)
    out = model(ids, cache=cache).logits.float()
    ref = hf(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.25  # bf16 carries ~3 significant digits
    assert model.rotary._inv_freq[torch.device("cpu")].dtype == torch.float32


def test_errors_name_the_problem():
    cfg = LlamaConfig(**TINY)
    cfg.model_type = "mistral"
    with pytest.raises(TargetError, match="model_type='mistral'"):
        ModelConfig.from_hf(cfg)
    bad = tiny_hf("llama", "default")
    bad.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4}
    with pytest.raises(TargetError, match="longrope"):
        LlamaFamilyModel.from_hf(bad)
    model = ours_of(tiny_hf())
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.real
@torch.inference_mode()
def test_real_smollm2_equals_hf():
    from scylla.modeling.targets import load_hf_model, load_tokenizer

    hf = load_hf_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    model = LlamaFamilyModel.from_hf(hf)
    assert model.config.eos_token_ids == [2] and model.config.tie_word_embeddings
    msgs = [{"role": "user", "content": "Explain speculative decoding in two sentences."}]
    ids = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)])
    ref = hf(ids).logits
    cache = model.new_cache(1, ids.shape[1] + 4)
    prefill = model(ids[:, :-3], cache=cache).logits
    steps = [model(ids[:, t: t + 1], cache=cache).logits
             for t in range(ids.shape[1] - 3, ids.shape[1])]
    # 30 fp32 layers summed in another order (cached steps, our oneDNN-packed kernels against
    # HF's MKL ones) leave ~1e-4 on logits of magnitude ~15: each side is within ~8e-5 of an
    # fp64 forward (measured: max 7.2e-5 ours, 7.9e-5 F.linear), so they may differ by twice
    # that (1.44e-4 measured). atol 2e-4 plus a relative 1e-5 (~80 ulps) absorbs it; a real bug
    # (RoPE, masking, norms) moves logits by >0.1.
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), ref, atol=2 * ATOL, rtol=1e-5)


def test_linear_transposed_copy_tracks_weight_and_autograd():
    from scylla.modeling import Linear

    torch.manual_seed(0)
    lin = Linear(8, 6)
    x = torch.randn(1, 1, 8)
    with torch.inference_mode():
        y0 = lin(x)  # few rows: the transposed-copy path
    torch.testing.assert_close(y0, torch.nn.functional.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place update (an optimiser step) must not read a stale copy
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    # autograd through a frozen layer (a draft trained through the target's LM head)
    lin.requires_grad_(False)
    xg = torch.randn(1, 1, 8, requires_grad=True)
    lin(xg).sum().backward()
    torch.testing.assert_close(xg.grad[0, 0], lin.weight.sum(0))


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_lm_head_equals_linear_for_every_row_count(rows):
    from scylla.modeling.layers import LMHead

    torch.manual_seed(0)
    head = LMHead(8, 300, bias=True)
    x = torch.randn(rows, 1, 8)
    with torch.inference_mode():
        y = head(x)
    assert y.shape == (rows, 1, 300)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, head.weight, head.bias))


@torch.inference_mode()
def test_cache_row_prefill_equals_batched_prefill():
    gen = torch.Generator().manual_seed(4)
    model = ours_of(tiny_hf("llama", "default"))
    lens = [9, 3]
    prompts = torch.randint(0, 256, (2, 9), generator=gen)
    batched = model.new_cache(2, 16)
    model(prompts, cache=batched)
    batched.set_lengths(lens)
    by_row = model.new_cache(2, 16)
    for b, n in enumerate(lens):
        row = by_row.row(b)
        model(prompts[b:b + 1, :n], cache=row)
        assert row.lengths.tolist() == [n]
    assert by_row.lengths.tolist() == [0, 0]  # the parent's lengths are set by its owner
    by_row.set_lengths(lens)
    for b, n in enumerate(lens):
        torch.testing.assert_close(by_row.k[:, b, :, :n], batched.k[:, b, :, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(by_row.v[:, b, :, :n], batched.v[:, b, :, :n], atol=ATOL, rtol=0)


def test_model_built_under_inference_mode_trains_drafts():
    with torch.inference_mode():
        model = ours_of(tiny_hf())
    model.requires_grad_(False)
    h = torch.randn(1, 3, 64, requires_grad=True)
    model.lm_head(model.norm(h)).logsumexp(-1).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
