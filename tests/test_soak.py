"""Soak: 2,000 prompts through `scylla bench` in one process, with stable memory.

The target is a tiny random Llama (hidden 64, 2 layers) saved as a local HF checkpoint with
the real SmolLM2 tokenizer, so prompts take the real chat-template and tokenizer path while
2,000 of them decode in minutes on one core. One loaded ``Bench`` (what `scylla bench` holds)
runs ``run_bench`` on consecutive chunks of 100 prompts, and the process RSS is read after
each chunk: a leak of even a few KB per prompt shows as steady growth.
"""
from __future__ import annotations

import gc
import json
import random
import time

import psutil  # installed with accelerate, a dependency of the project
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scylla.commands.bench import load_bench, load_bench_prompts, run_bench
from scylla.config import DecodeConfig, TargetSpec

PROMPTS = 2000
CHUNK = 100
WARM_PROMPTS = 500  # allocator pools, tokenizer caches and torch's kernels settle by then
# 14 KB per prompt over the 1,500 after warm-up; a kept KV cache of this tiny model is
# several times that. Measured here: flat to the MB.
MAX_GROWTH_MB = 20
METHODS = ["plain", "pld"]
CATEGORIES = ["writing", "qa", "coding", "summarization"]
WORDS = ("cache token draft verify tree model batch layer prompt speed answer question "
         "write explain list compare summary code python memory time loss").split()


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from scylla.modeling.targets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    # Tied embeddings at this init scale: greedy outputs fall into short loops after a few
    # tokens, so pld's drafts are accepted in part (tau about 1.35) and its accept, reject
    # and cache-rollback paths all run (at 0.02 every row repeats one token, at 0.2 none loops).
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        # EOS's logit is then exactly 0, far below the top one: every prompt decodes
        # max_new_tokens tokens, so the token total checks each prompt's output
        hf.lm_head.weight[tok.eos_token_id] = 0
    out = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(4, 120))
            f.write(json.dumps({"id": f"soak-{i}", "category": CATEGORIES[i % len(CATEGORIES)],
                                "prompt": " ".join(words)}) + "\n")


def rss_mb(process: psutil.Process) -> float:
    gc.collect()
    return process.memory_info().rss / 2**20


@pytest.mark.slow
@pytest.mark.real  # the real target's tokenizer
def test_2000_prompts_through_bench_in_one_process_with_stable_memory(tiny_target, tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, PROMPTS)
    spec = TargetSpec(target=str(tiny_target))
    cfg = DecodeConfig(max_new_tokens=16, decode_batch_size=4)
    prompts = load_bench_prompts(str(path), PROMPTS)
    assert len(prompts) == PROMPTS
    process = psutil.Process()
    bench = load_bench(spec, None)
    start = time.perf_counter()
    rss = [rss_mb(process)]  # rss[k]: after k chunks
    for lo in range(0, PROMPTS, CHUNK):
        report = run_bench(spec, cfg, METHODS, prompts[lo:lo + CHUNK], bench=bench)
        by = {m["method"]: m for m in report["methods"]}
        for m in by.values():
            assert m["new_tokens"] == CHUNK * cfg.max_new_tokens, (lo, m["method"])
            assert m["exact_match"], (lo, m["method"], m["mismatches"])
        assert by["pld"]["tau"] > 1, f"prompts {lo}..: pld accepted no draft token"
        rss.append(rss_mb(process))
    seconds = time.perf_counter() - start
    warm = rss[WARM_PROMPTS // CHUNK]
    growth = max(rss[WARM_PROMPTS // CHUNK:]) - warm
    print(f"\nsoak: {PROMPTS} prompts x {METHODS} in {seconds:.0f} s; RSS MB start {rss[0]:.0f}, "
          f"after {WARM_PROMPTS} {warm:.0f}, peak {max(rss):.0f}, end {rss[-1]:.0f}; per "
          f"{CHUNK}: {' '.join(f'{r:.0f}' for r in rss)}")
    assert growth < MAX_GROWTH_MB, (
        f"RSS grew {growth:.1f} MB from prompt {WARM_PROMPTS} to {PROMPTS} (bound "
        f"{MAX_GROWTH_MB} MB): {[round(r) for r in rss]}")
