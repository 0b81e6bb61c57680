"""Draft models: the decoding interface, frozen shared weights, unrolling, checkpoints, vocab."""
from __future__ import annotations

import pytest
import torch
from drafts_fixtures import tiny_target

from scylla.drafts import DraftModel, draft_spec, instantiate, load_draft, save_draft
from scylla.drafts.objective import chain_counts, objective, replay, survival, tau_chain
from scylla.drafts.unroll import unroll
from scylla.drafts.vocab import build_d2t, t2d_of, token_counts
from scylla.errors import ConfigError, DataError, DraftMismatchError


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def make(target, kind="scylla", n_layer=None, vocab=0, seed=0, layers="") -> DraftModel:
    n_layer = n_layer or (1 if kind == "eagle3" else 2)  # an eagle3 draft has one layer
    d2t = torch.arange(3, 3 + vocab) * 2 if vocab else None
    torch.manual_seed(seed)
    return instantiate(draft_spec(kind, n_layer, target, vocab, layers), target, d2t)


def target_features(target, draft, ids):
    out = target.model(ids, hidden_layers=draft.feature_layers)
    return draft.features(out), out


@pytest.mark.parametrize("kind", ["scylla", "eagle3"])
def test_forward_shapes_and_frozen_shared_weights(target, kind):
    draft = make(target, kind, vocab=40)
    ids = torch.randint(3, 256, (2, 9))
    feats, _ = target_features(target, draft, ids)
    assert feats.shape == (2, 9, 64 * (3 if kind == "eagle3" else 1))
    out = draft(ids, feats)
    assert out.logits.shape == (2, 9, 40) and out.hidden.shape == (2, 9, 64)
    # the embedding is the target's own tensor (no copy) and never saved
    assert draft.embed_weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    state = draft.state_dict()
    assert not any(k.startswith(("embed_weight", "target_head_weight")) for k in state)
    assert torch.equal(draft.target_head_weight, target.model.lm_head.weight[draft.d2t])
    trainable = sum(p.numel() for p in draft.parameters())
    assert draft.draft_params == trainable
    assert draft.draft_params < sum(v.numel() for v in state.values()) + 1  # d2t is no param


def test_scylla_params_grow_with_layers_and_exclude_the_frozen_head(target):
    one, two = make(target, n_layer=1), make(target, n_layer=2)
    per_layer = two.draft_params - one.draft_params
    assert per_layer == sum(p.numel() for p in two.layers[1].parameters())
    assert one.draft_params == 2 * 64 * 64 + 64 + per_layer  # fc (2H->H, bias) + one layer


def test_eagle3_fuses_features_or_takes_its_own_hidden(target):
    draft = make(target, "eagle3", layers="1,2,4")
    assert draft.feature_layers == (1, 2, 4)
    ids = torch.randint(3, 256, (1, 6))
    feats, _ = target_features(target, draft, ids)
    own = draft(ids, feats).hidden
    assert draft(ids, own).logits.shape == (1, 6, 256)  # H-wide features pass unfused
    with pytest.raises(ConfigError, match="features of width 192"):
        draft(ids, feats[..., :100])
    with pytest.raises(ConfigError, match="feature_layers='0,9'"):
        make(target, "eagle3", layers="0,9")
    assert make(target, "eagle3").feature_layers == (2, 2, 1)  # EAGLE-3's (2, L//2, L-3), L=4


@pytest.mark.parametrize("kind", ["scylla", "eagle3"])
@torch.no_grad()
def test_cache_chunks_and_tree_mask_match_one_forward(target, kind):
    draft = make(target, kind)
    ids = torch.randint(3, 256, (2, 12))
    feats, _ = target_features(target, draft, ids)
    ref = draft(ids, feats)
    cache = draft.new_cache(2, 32)
    parts = [draft(ids[:, a:b], feats[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 12)]]
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), ref.logits,
                               atol=1e-5, rtol=0)
    # a causal tree mask over the appended tokens equals the default
    cache2 = draft.new_cache(2, 32)
    draft(ids[:, :7], feats[:, :7], cache=cache2)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    tree = draft(ids[:, 7:], feats[:, 7:], cache=cache2, tree_mask=causal)
    torch.testing.assert_close(tree.logits, ref.logits[:, 7:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["scylla", "eagle3"])
@torch.no_grad()
def test_unroll_equals_step_by_step_drafting_with_a_cache(target, kind):
    """Unrolled step k at row t == drafting k steps after context x_0..x_{t+1} for real."""
    draft = make(target, kind)
    ids = torch.randint(3, 256, (1, 16))
    feats, _ = target_features(target, draft, ids)
    steps = 4
    hiddens = unroll(draft, ids, feats, steps)
    assert len(hiddens) == steps and hiddens[0].shape == (1, 15, 64)
    for t in (0, 5, 10):
        cache = draft.new_cache(1, 64)
        # the context: row positions 0..t hold tokens x_1..x_{t+1} and target features f_0..f_t
        h = draft(ids[:, 1:t + 2], feats[:, :t + 1], cache=cache).hidden[:, -1:]
        torch.testing.assert_close(h[0, 0], hiddens[0][0, t], atol=1e-5, rtol=0)
        for k in range(1, steps):
            if t + 1 + k >= 16:
                break
            h = draft(ids[:, t + 1 + k:t + 2 + k], h, cache=cache).hidden
            torch.testing.assert_close(h[0, 0], hiddens[k][0, t], atol=1e-5, rtol=0)


def test_unroll_has_gradients_through_every_step(target):
    draft = make(target, "eagle3")
    ids = torch.randint(3, 256, (2, 10))
    feats, out = target_features(target, draft, ids)
    hiddens = unroll(draft, ids, feats, 3, noise=torch.zeros(2, 9, 192))
    mask = torch.ones(2, 10)
    obj = objective(draft, hiddens, out.last_hidden, mask, 1.0, 0.1, 0.8)
    obj.loss.backward()
    assert len(obj.steps) == 3 and all(s.rows > 0 for s in obj.steps)
    assert obj.steps[2].rows == 2 * (10 - 4)  # step k counts rows t with t + 2 + k < T
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in draft.parameters() if p.requires_grad)


@pytest.mark.parametrize("rows", [1, 4, 20])
def test_draft_readout_equals_the_linear_head_and_keeps_gradients(target, rows):
    """The readout takes the GEMM seam for a tree level's frontier and gives F.linear's
    logits; under autograd it falls back to F.linear, whose gradient reaches the hidden state."""
    draft = make(target)
    torch.manual_seed(0)
    h = torch.randn(2, rows, draft.target_head_weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(draft.readout(h),
                                   torch.nn.functional.linear(h, draft.target_head_weight))
    h.requires_grad_(True)
    draft.readout(h).sum().backward()
    torch.testing.assert_close(h.grad, draft.target_head_weight.sum(0).expand_as(h))


def test_tau_chain_is_one_plus_the_sum_of_chain_survival():
    assert tau_chain([0, 0, 0], 10) == 1.0
    assert tau_chain([10, 10, 10], 10) == 4.0
    # acc_1 = 0.8, acc_2 = 0.5, acc_3 = 0.5: tau = 1 + 0.8 + 0.4 + 0.2
    assert tau_chain([8, 4, 2], 10) == pytest.approx(2.4)


def test_replayed_chain_decoding_spends_its_forwards_where_acceptance_is_low():
    """After the prefill's token, an easy stretch (4, 3, 2, 1 accepted) then a hard one (0s):
    the mean over positions (tau_chain) is 2.0, but decoding writes the first token in the
    prefill, crosses the easy stretch in one forward and needs one per token on the hard one:
    10 tokens in 6 forwards."""
    starts = torch.ones(1, 10, dtype=torch.bool)
    accepted = torch.tensor([[0, 4, 3, 2, 1, 0, 0, 0, 0, 0]])
    gamma = 4
    n, chains = survival(starts, accepted, gamma)
    assert (n, chains) == (10, [4, 3, 2, 1]) and tau_chain(chains, n) == 2.0
    assert replay(starts, accepted) == (10, 6)
    # the first chain (from the prompt's last row) never runs: the prefill writes that token
    assert replay(starts, torch.tensor([[4, 0, 0, 0, 0, 0, 0, 0, 0, 0]])) == (10, 10)
    # a position outside the loss mask starts no chain: two answers, each with its prefill
    starts[0, 6:8] = False
    assert replay(starts, accepted * starts) == (8, 4)
    # a chain accepted to the answer's end adds no target token past it (decoding stops there)
    assert replay(torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 0, 2, 1]])) == (4, 3)


@torch.no_grad()
def test_chain_counts_follow_the_first_rejection(target):
    draft = make(target)
    ids = torch.randint(3, 256, (1, 8))
    feats, _ = target_features(target, draft, ids)
    hiddens = unroll(draft, ids, feats, 3)
    mask = torch.ones(1, 8)
    guess0 = draft.readout(hiddens[0]).argmax(-1)  # (1, 7): row t guesses the token at t+2
    never = torch.full((1, 8), -1)
    assert chain_counts(draft, hiddens, mask, never) == (6, [0, 0, 0])  # rows t <= 5 start
    agree = never.clone()
    agree[0, 1:] = guess0[0]  # the target's greedy token at t+1 is the draft's step-1 guess
    agree[0, 3] = -1  # ... except for the chain starting at t = 2
    starts, chains = chain_counts(draft, hiddens, mask, agree)
    assert starts == 6 and chains[0] == 5 and chains[2] <= chains[1] <= 5
    mask[0, 5:] = 0  # chains whose first token lies outside the mask do not start
    assert chain_counts(draft, hiddens[:1], mask, agree) == (3, [2])


def test_save_load_round_trip_and_target_mismatch(target, tmp_path):
    draft = make(target, "eagle3", vocab=30, seed=3)
    with torch.no_grad():
        draft.fc.weight.add_(0.5)  # something a fresh draft would not have
    path = save_draft(draft, tmp_path / "d", extra={"train_tokens": 123})
    files = sorted(p.name for p in path.iterdir())
    assert files == ["draft.json", "draft.safetensors"]
    loaded = load_draft(path, target)
    ids = torch.randint(3, 256, (1, 7))
    feats, _ = target_features(target, draft, ids)
    torch.testing.assert_close(loaded(ids, feats).logits, draft(ids, feats).logits, atol=0, rtol=0)
    assert torch.equal(loaded.d2t, draft.d2t) and loaded.spec.extra["train_tokens"] == 123
    # the frozen 256 x 64 embedding is not in the checkpoint
    assert path.joinpath("draft.safetensors").stat().st_size < 4 * draft.draft_params + 4096

    with pytest.raises(DraftMismatchError, match="hidden_size: draft built for 64, target has 32"):
        load_draft(path, tiny_target(hidden_size=32, intermediate_size=64))
    with pytest.raises(DraftMismatchError, match="vocab_size: draft built for 256, target has 300"):
        load_draft(path, tiny_target(vocab_size=300))
    with pytest.raises(DraftMismatchError, match="name: draft built for 'tiny'"):
        load_draft(path, tiny_target(name="other"))
    with pytest.raises(DataError, match="no draft config"):
        load_draft(tmp_path, target)
    # a `scylla train` output directory holds its draft in draft/
    save_draft(draft, tmp_path / "run" / "draft")
    assert torch.equal(load_draft(tmp_path / "run", target).fc.weight, draft.fc.weight)


def test_pruned_vocab_keeps_the_most_frequent_tokens_and_eos():
    seqs = [([5, 5, 5, 7, 7, 9, 4], [1, 1, 1, 1, 1, 1, 0]), ([9, 9, 3], [0, 1, 1])]
    counts = token_counts(seqs, 12)
    assert counts.tolist() == [0, 0, 0, 1, 0, 3, 0, 2, 0, 2, 0, 0]  # 4 and the first 9: unmasked
    d2t = build_d2t(counts, 4, always=[2])
    assert d2t.tolist() == [2, 5, 7, 9]  # 3 (count 1) loses to the EOS id 2
    assert build_d2t(counts, 6, always=[2]).tolist() == [0, 2, 3, 5, 7, 9]  # ties: lower id
    t2d = t2d_of(d2t, 12)
    assert t2d[d2t].tolist() == [0, 1, 2, 3] and t2d[4] == -1
    with pytest.raises(ConfigError, match="draft_vocab_size=13"):
        build_d2t(counts, 13)


def test_pruned_draft_maps_its_ids_to_target_ids(target):
    draft = make(target, vocab=20)
    ids = torch.randint(3, 256, (1, 5))
    feats, _ = target_features(target, draft, ids)
    out = draft(ids, feats)
    top = draft.to_target_ids(out.logits.argmax(-1))
    assert set(top.flatten().tolist()) <= set(draft.d2t.tolist())
    with pytest.raises(ConfigError, match="needs a d2t map"):
        instantiate(draft_spec("scylla", 1, target, 20), target, None)
