"""The training's acceptance estimate is linked to decoding: on the target's own greedy answers,
``val/tau_chain_replayed`` (logged by validation) is the τ chain decoding measures on the same
prompts with the same draft, and ``val/tau_chain`` (a mean over positions) is not.

A tiny random target is too hard for a draft to learn from a few thousand tokens (trained drafts
reach τ ~1.06 here), and a draft that accepts almost nothing would link 1 to 1. So the draft
starts as a noisy copy of the one-layer target (its layer, and ``fc`` passing the token's
embedding), and training runs at a learning rate too small to move it: validation, the saved
draft and decoding are the real paths, with acceptance that varies along the text."""
from __future__ import annotations

import pytest
import torch
from decoding_fixtures import EOS, prompts_of
from drafts_fixtures import header, tiny_target

from scylla.config import DecodeConfig, DraftConfig, TrainConfig
from scylla.data.shards import ShardReader, load_manifest
from scylla.data.target_text import AnswerPrompt, build_answer_shards
from scylla.decoding import METHODS
from scylla.drafts import load_draft
from scylla.drafts import train as training
from scylla.drafts.data import shard_source

VOCAB, MAX_LEN, NEW, GAMMA = 256, 96, 40, 3
NOISE = 0.05  # relative weight noise: the copy then accepts ~half its tokens, unevenly


def answer_shards(target, directory, prompts, store_argmax):
    build_answer_shards(target.model, iter(prompts), directory, header(target), 10**9,
                        max_seq_len=MAX_LEN, max_new_tokens=NEW, eos_token_ids=[EOS],
                        batch_size=8, hidden_dtype="float32", tokens_per_shard=2000,
                        store_argmax=store_argmax, progress=False)
    return load_manifest(directory).total_tokens


def prompts(n, seed):
    ids = prompts_of([4 + (5 * i) % 28 for i in range(n)], VOCAB, seed)  # room for NEW tokens
    return [AnswerPrompt(f"s{seed}-{i}", p) for i, p in enumerate(ids)]


def noisy_copy(new_draft):
    def make(target, draft_cfg, cfg, d2t):
        draft = new_draft(target, draft_cfg, cfg, d2t)
        hidden = target.model.config.hidden_size
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            draft.layers[0].load_state_dict(target.model.layers[0].state_dict())
            draft.fc.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1))
            draft.fc.bias.zero_()
            for w in draft.parameters():
                w.add_(NOISE * w.abs().mean() * torch.randn(w.shape, generator=g))
        return draft
    return make


def test_replayed_tau_chain_is_what_chain_decoding_measures_on_target_text(tmp_path,
                                                                          monkeypatch):
    target = tiny_target(num_hidden_layers=1, vocab_size=VOCAB)
    assert target.eos_token_ids == [EOS]  # some answers end early
    monkeypatch.setattr(training, "new_draft", noisy_copy(training.new_draft))
    train_prompts, val_prompts = prompts(8, 0), prompts(12, 1)
    train_tokens = answer_shards(target, tmp_path / "train", train_prompts, False)
    val_tokens = answer_shards(target, tmp_path / "val", val_prompts, True)
    cfg = TrainConfig(train_tokens=train_tokens, val_tokens=val_tokens, train_batch_size=4,
                      lr=1e-9, warmup_steps=0, val_chain_len=GAMMA, checkpoint_every=10**6)
    res = training.train_draft(
        target, DraftConfig(), cfg, shard_source(str(tmp_path / "train"), train_tokens, "t", "--t"),
        shard_source(str(tmp_path / "val"), val_tokens, "v", "--v"), tmp_path / "out",
        progress=False)
    draft = load_draft(res["draft"], target)

    dec = METHODS["chain"](target, [p.ids for p in val_prompts],
                           DecodeConfig(method="chain", max_new_tokens=NEW, draft_len=GAMMA,
                                        decode_batch_size=4), draft)
    reader = ShardReader(tmp_path / "val")
    answers = [reader[i]["input_ids"][len(p.ids):].tolist() for i, p in enumerate(val_prompts)]
    assert dec.tokens == answers  # the validation text is what decoding writes
    decoded = dec.new_tokens / dec.target_forwards  # decode/tau, the prefill counted
    assert decoded > 1.5  # the draft accepts tokens: the link is not 1 == 1
    assert res["val/tau_chain_replayed"] == pytest.approx(decoded, rel=1e-6)
    # the per-position mean is another number on the same text (measured: 2.32 against 2.22)
    assert abs(res["val/tau_chain"] - decoded) > 0.02
