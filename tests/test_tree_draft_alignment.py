"""Decoding feeds the draft exactly as training unrolls it (EAGLE shift, positions, features,
masks): the chain a draft grows while decoding equals the argmax chain of the training-time
unroll (``scylla.drafts.unroll``) over the same tokens. Both draft kinds; a pruned vocabulary."""
from __future__ import annotations

import pytest
import torch
from decoding_fixtures import prompts_of, random_draft, tiny_target

from scylla.decoding.drafter import DraftProposer
from scylla.decoding.expand import chain_shape
from scylla.decoding.prefill import prefill
from scylla.drafts.unroll import unroll

DEPTH = 4


@pytest.mark.parametrize("kind,pruned", [("scylla", False), ("eagle3", False), ("scylla", True)])
@torch.inference_mode()
def test_decode_chain_equals_training_unroll(kind, pruned):
    target = tiny_target(96)
    d2t = torch.arange(0, 96, 2) if pruned else None
    draft = random_draft(target, kind=kind, d2t=d2t)
    for layer in draft.layers:  # sharp attention: a wrong position or mask flips the chain
        layer.self_attn.qkv_proj.weight.mul_(6.0)
    prompts = prompts_of([9, 5], 96, seed=4)
    model = target.model
    proposer = DraftProposer(draft, chain_shape(DEPTH), 0.0, 1.0, model.config.vocab_size)
    pre = prefill(model, prompts, 64, proposer.hidden_layers, 0.0, 1.0, None)
    state = proposer.start(pre)
    tree, _ = state.propose(pre.first, pre.cache.lengths.clone(), None)
    chains = tree.tokens[:, 1:]  # (B, DEPTH) the draft's greedy chain after the root
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + [int(pre.first[b])] + chains[b].tolist()])
        out = model(seq, hidden_layers=draft.feature_layers)
        hidden = unroll(draft, seq, draft.features(out), steps=DEPTH)
        t = len(prompt) - 1  # the chain starts at the row whose token is the root
        want = [int(draft.to_target_ids(draft.readout(h[:, t]).argmax(-1))) for h in hidden]
        assert chains[b].tolist() == want
