"""Tiny random targets and a synthetic corpus for the hidden-state, draft and training tests."""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scylla.modeling import LlamaFamilyModel
from scylla.modeling.targets import Target

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=2, bos_token_id=1, pad_token_id=0,
            # larger than HF's 0.02: the greedy token then depends on the context strongly
            # enough for a draft to learn it from a few thousand tokens
            initializer_range=0.15)


def tiny_hf(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def tiny_target(name: str = "tiny", seed: int = 0, **overrides) -> Target:
    """A Target whose model is our forward over a tiny random Llama (no tokenizer)."""
    model = LlamaFamilyModel.from_hf(tiny_hf(seed, **overrides))
    return Target(name=name, path="", model=model, tokenizer=None,
                  device=torch.device("cpu"), dtype=torch.float32)


def synthetic_examples(n: int = 60, seed: int = 0, vocab: int = 256, min_len: int = 12,
                       max_len: int = 70) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids int32, loss_mask uint8) pairs: a "prompt" then a masked "reply" that follows
    a fixed random successor table most of the time, so a draft has something to learn.
    ``seed`` draws the sequences; the table is the same for every seed."""
    successor = np.random.default_rng(12345).integers(3, vocab, size=vocab)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len))
        ids = np.empty(length, dtype=np.int32)
        ids[0] = 1
        for t in range(1, length):
            ids[t] = successor[ids[t - 1]] if rng.random() < 0.8 else rng.integers(3, vocab)
        mask = np.zeros(length, dtype=np.uint8)
        mask[length // 3:] = 1
        out.append((ids, mask))
    return out


def header(target: Target, layers=(), split: str = "train") -> dict:
    return {"target": {"name": target.name, "hidden_size": target.model.config.hidden_size,
                       "vocab_size": target.model.config.vocab_size,
                       "num_hidden_layers": target.model.config.num_hidden_layers},
            "corpus": "synthetic", "split": split, "layers": list(layers), "max_seq_len": 1024}
