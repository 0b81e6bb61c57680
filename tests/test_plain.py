"""Plain decoding: exact greedy agreement with HF generate, batching, EOS, sampling, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from scylla.decoding.plain import plain_decode
from scylla.decoding.sampling import sample
from scylla.errors import DataError
from scylla.modeling import LlamaFamilyModel

V = 128


def tiny(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    # initializer_range 0.3: peaked next-token distributions, so greedy outputs vary by
    # prompt (HF's 0.02 makes every row repeat one token) and near-ties are rare
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
              initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cls = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    hf = cls[0](cls[1](**kw)).eval()
    return hf, LlamaFamilyModel.from_hf(hf)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], max_new: int, eos: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]),
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                      pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_hf_generate_batch_1(kind):
    hf, model = tiny(kind)
    prompts = prompts_of([5, 12, 1])
    res = plain_decode(model, prompts, 20, [2], decode_batch_size=1)
    for p, got in zip(prompts, res.tokens):
        assert got == hf_greedy(hf, p, 20, [2])
    assert len(set(map(tuple, res.tokens))) == 3  # the outputs differ: the check has teeth


def test_mixed_lengths_and_eos_mid_batch_equal_hf_and_one_by_one():
    hf, model = tiny("llama", seed=1)
    prompts = prompts_of([3, 17, 8, 11, 6], seed=1)
    free = plain_decode(model, prompts, 24, [], decode_batch_size=1).tokens
    # an EOS that one row produces early while the others run on
    eos = free[2][4]
    stop_at = [t.index(eos) + 1 if eos in t else 24 for t in free]
    assert min(stop_at) < 24 and max(stop_at) == 24
    for batch in (2, 5):
        res = plain_decode(model, prompts, 24, [eos], decode_batch_size=batch)
        assert [len(t) for t in res.tokens] == stop_at
        for p, got in zip(prompts, res.tokens):
            assert got == hf_greedy(hf, p, 24, [eos])
        one = plain_decode(model, prompts, 24, [eos], decode_batch_size=1)
        assert res.tokens == one.tokens


def test_stats_count_every_forward_and_time_is_split():
    _, model = tiny()
    prompts = prompts_of([4, 9, 2])
    free = plain_decode(model, prompts, 10, []).tokens
    eos = free[1][2]
    res = plain_decode(model, prompts, 10, [eos])
    for toks, s in zip(res.tokens, res.stats):
        assert s.new_tokens == len(toks) == s.target_forwards == len(s.accepted_lengths)
        assert toks[-1] == eos or len(toks) == 10
    assert res.tau == 1.0
    sec = res.seconds
    assert sec["total"] > 0 and sec["verify"] > 0
    assert sec["draft"] + sec["verify"] + sec["other"] == pytest.approx(sec["total"])
    assert sec["draft"] < 0.01 * sec["total"]  # the empty proposer's start: nothing to draft


def test_sampling_is_seeded_and_follows_the_distribution():
    _, model = tiny()
    prompt = prompts_of([6])[0]
    runs = [plain_decode(model, [prompt] * 4, 8, [], temperature=0.8, sample_top_p=0.9,
                         generator=torch.Generator().manual_seed(7)).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(set(map(tuple, runs[0]))) > 1  # rows sampled independently
    # a top-p so small that only the best token is left is greedy
    greedy = plain_decode(model, [prompt], 8, []).tokens
    assert plain_decode(model, [prompt], 8, [], temperature=1.0, sample_top_p=1e-6,
                        generator=torch.Generator().manual_seed(0)).tokens == greedy
    # first-token frequencies over many rows match softmax(logits / T) within 4 sigma
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(logits / 0.7, -1)
    n = 4000
    draws = sample(logits.expand(n, V), 0.7, 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=V).float() / n
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-3).all()


def test_top_p_used_by_plain_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = sample(logits.expand(3000, 4), 1.0, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.75: tokens 2, 3 are cut
    assert 0.55 < counts[0] / counts[:2].sum() < 0.70  # renormalised: 0.5 / 0.8 = 0.625


def test_bad_prompts_raise_data_error_naming_the_prompt():
    _, model = tiny()
    with pytest.raises(DataError, match="prompt 1 is empty"):
        plain_decode(model, [[5, 6], []], 4, [2])
    with pytest.raises(DataError, match=r"prompt 2 has 90 tokens.*max_new_tokens=7.*97 > .*=96"):
        plain_decode(model, [[5], [6], [7] * 90], 7, [2])
    assert plain_decode(model, [[7] * 90], 6, []).new_tokens == 6  # exactly fits


@pytest.mark.real
def test_real_smollm2_greedy_equals_hf():
    from scylla.modeling.targets import load_hf_model, load_tokenizer

    hf = load_hf_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    model = LlamaFamilyModel.from_hf(hf)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for q in ["What is the capital of France?", "Write a haiku about the sea."]]
    res = plain_decode(model, prompts, 16, model.config.eos_token_ids, decode_batch_size=2)
    for p, got in zip(prompts, res.tokens):
        assert got == hf_greedy(hf, p, 16, model.config.eos_token_ids)
