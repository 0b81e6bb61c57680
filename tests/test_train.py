"""Draft training: the plan, learning, MLflow logging, exact resume, eagle3, pruned vocab,
online mode."""
from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest
import torch
from drafts_fixtures import header, synthetic_examples, tiny_target
from safetensors.torch import load_file

from scylla.commands.train import mlflow_logger
from scylla.config import DraftConfig, TrainConfig
from scylla.data.hidden_states import build_shards
from scylla.drafts import instantiate, load_draft
from scylla.drafts.data import (
    PlanSampler,
    collate,
    make_plan,
    online_features,
    shard_source,
    tokenized_source,
)
from scylla.drafts.objective import chain_counts, objective
from scylla.drafts.train import (
    check_shards,
    initial_draft,
    new_draft,
    train_draft,
    vocab_map,
)
from scylla.drafts.unroll import unroll
from scylla.drafts.vocab import (
    Vocabulary,
    load_vocab,
    save_vocab,
    token_counts,
)
from scylla.errors import ConfigError, DataError, DraftMismatchError
from scylla.pipeline.tracking import stage_run

TRAIN, VAL = 4000, 800
LAYERS = (2, 3, 4)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def shards(target, tmp_path_factory):
    """Train and val shards (fp32, with EAGLE-3's layers) of the synthetic corpus."""
    root = tmp_path_factory.mktemp("shards")
    build_shards(target.model, iter(synthetic_examples(120)), root / "train",
                 header(target, LAYERS), TRAIN, layers=LAYERS, hidden_dtype="float32",
                 tokens_per_shard=1000, progress=False)
    build_shards(target.model, iter(synthetic_examples(20, seed=1)), root / "val",
                 header(target, LAYERS, "val"), VAL, layers=LAYERS, hidden_dtype="float32",
                 tokens_per_shard=1000, store_argmax=True, progress=False)
    return root


def sources(root, train=TRAIN, val=VAL):
    return (shard_source(str(root / "train"), train, "train_tokens", "--build-tokens"),
            shard_source(str(root / "val"), val, "val_tokens", "--val-tokens"))


def config(**kw):
    base = dict(train_tokens=TRAIN, train_batch_size=4, val_tokens=VAL, checkpoint_every=4,
                lr=1e-2, warmup_steps=2, val_chain_len=3)
    return TrainConfig(**{**base, **kw})


def weights(out):
    return load_file(str(out / "draft" / "draft.safetensors"))


# ---- the plan


def test_plan_is_nested_deterministic_and_staged():
    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    plan = make_plan(lengths, 100, 2, 1, 0)
    seqs = sorted(i.seq for b in plan.batches for i in b)
    assert seqs == [0, 1, 2, 3]  # the shortest prefix reaching 100 tokens
    assert plan.batches[-1][-1].tokens_seen == 100
    assert make_plan(lengths, 100, 2, 1, 0).digest == plan.digest
    assert make_plan(lengths, 100, 2, 1, 1).digest != plan.digest
    staged = make_plan(lengths, 60, 2, 2, 0, pretrain_tokens=300)
    full = [b[0].full_mask for b in staged.batches]
    # pretraining: 8 sequences reach 300 tokens (4 batches per epoch); SFT: 3 reach 60
    assert full == [True] * 8 + [False] * 4
    pre = sorted(i.seq for b in staged.batches if b[0].full_mask for i in b)
    assert pre == sorted(list(range(8)) * 2)  # two epochs, each over the whole prefix
    sft = [i.seq for b in staged.batches if not b[0].full_mask for i in b]
    assert sorted(sft) == [0, 0, 1, 1, 2, 2]
    tail = make_plan([1] * 9, 9, 4, 1, 0).batches
    assert [len(b) for b in tail] == [4, 5]  # a tail under half a batch joins the one before
    ts = [b[-1].tokens_seen for b in staged.batches]
    assert ts == sorted(ts)


def test_sampler_splits_batches_over_ranks_and_skips_done_steps():
    plan = make_plan([5] * 20, 100, 4, 1, 0)
    ranks = [list(PlanSampler(plan, r, 2)) for r in range(2)]
    for b, (a, c) in enumerate(zip(*ranks)):
        assert sorted(a + c) == sorted(plan.batches[b])
    assert list(PlanSampler(plan, 0, 1, start=3)) == plan.batches[3:]


# ---- training


def test_training_learns_logs_to_mlflow_and_saves_a_loadable_draft(target, shards, tmp_path,
                                                                   mlflow_store):
    train, val = sources(shards)
    with stage_run("train", {"train_tokens": TRAIN, "draft_n_layer": 1}) as run:
        res = train_draft(target, DraftConfig(), config(), train, val, tmp_path,
                          logger=mlflow_logger(run.info.run_id), progress=False)
    client = mlflow.MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.params["draft_params"] == str(res["draft_params"])
    for name in ("train/loss", "train/loss_hidden", "train/loss_logits", "train/acc",
                 "train/tokens_seen", "val/top1_acc", "val/tau_chain", "val/alpha_at_3"):
        assert name in data.metrics, name
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # the train loss falls (from a start already at fc alone; the held-out check below is the
    # strict one)
    assert len(losses) >= 5 and losses[-1] < 0.95 * losses[0]
    seen = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_seen")]
    assert seen == sorted(seen) and seen[-1] >= TRAIN
    assert 1.0 <= res["val/tau_chain"] <= 1.0 + 3
    assert res["val/top1_acc"] == pytest.approx(res["val/alpha_at_1"])
    draft = load_draft(res["draft"], target)
    assert draft.draft_params == res["draft_params"] and draft.spec.extra["train"]["seed"] == 0
    # the trained draft beats its own initialisation on held-out data
    untrained = new_draft(target, DraftConfig(), config(), None)
    batch = collate([val[i] for i in range(len(val))])
    scores = []
    for d in (untrained, draft):
        with torch.no_grad():
            hiddens = unroll(d, batch["input_ids"], batch["last_hidden"], 1)
            obj = objective(d, hiddens, batch["last_hidden"], batch["loss_mask"], 1.0, 0.1, 0.8)
            starts, chains = chain_counts(d, hiddens, batch["loss_mask"], batch["target_argmax"])
        scores.append((float(obj.loss), chains[0] / starts))
    assert scores[1][0] < 0.9 * scores[0][0] and scores[1][1] > 2 * scores[0][1]
    assert scores[1][1] == pytest.approx(res["val/top1_acc"], abs=1e-6)


def test_a_killed_training_resumes_to_the_same_weights(target, shards, tmp_path):
    train, val = sources(shards)
    cfg = config(feature_noise=0.2)
    whole = train_draft(target, DraftConfig(), cfg, train, val, tmp_path / "whole",
                        progress=False)
    steps = whole["planned_steps"]
    assert steps >= 20
    killed = train_draft(target, DraftConfig(), cfg, train, val, tmp_path / "killed",
                         progress=False, max_steps=12)
    assert killed["steps"] == 12 and "draft" not in killed
    resumed = train_draft(target, DraftConfig(), cfg, train, val, tmp_path / "killed",
                          progress=False)
    assert resumed["steps"] == steps
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["val/tau_chain"] == whole["val/tau_chain"]
    # a resumed run never continues with other parameters or on another data plan
    for other in (config(seed=1), config(feature_noise=0.2, lr=cfg.lr / 2)):
        with pytest.raises(ConfigError, match=r"other parameters \(.*train\.(lr|seed)"):
            train_draft(target, DraftConfig(), other, train, val, tmp_path / "killed",
                        progress=False)
    (tmp_path / "killed" / "run_params.json").unlink()  # a checkpoint from before the record
    with pytest.raises(ConfigError, match="another data plan"):
        train_draft(target, DraftConfig(), config(seed=1), train, val, tmp_path / "killed",
                    progress=False)


def test_eagle3_trains_with_its_training_time_test(target, shards, tmp_path):
    train, val = sources(shards)
    res = train_draft(target, DraftConfig(kind="eagle3", feature_layers="2,3,4"), config(),
                      train, val, tmp_path, progress=False)
    assert "train/loss_step2" in res and "train/loss_hidden" not in res
    draft = load_draft(res["draft"], target)
    assert draft.feature_layers == (2, 3, 4) and draft.spec.extra["ttt_steps"] == 3
    with pytest.raises(DataError, match=r"lacks target layers \[1\]"):
        check_shards(train, target, config(), (1, 2), "shards")
    with pytest.raises(DataError, match=r"shards lack target layers \[1\]"):
        train_draft(target, DraftConfig(kind="eagle3"), config(), train, val, tmp_path / "x",
                    progress=False)  # EAGLE-3's default layers for 4 layers: (2, 2, 1)


def fixed_vocab(path):
    """A vocabulary file counted on a larger sample than any budget of these tests."""
    counts = token_counts(synthetic_examples(300, seed=7), 256)
    return save_vocab(Vocabulary(counts, "synthetic, 300 conversations", "tiny"), path)


def test_pruned_vocabulary_trains_and_keeps_eos(target, shards, tmp_path):
    train, val = sources(shards)
    vocab = fixed_vocab(tmp_path / "vocab.safetensors")
    res = train_draft(target, DraftConfig(draft_vocab_size=64), config(), train, val, tmp_path,
                      progress=False, vocab=vocab)
    draft = load_draft(res["draft"], target)
    assert draft.d2t.shape == (64,) and 2 in draft.d2t.tolist()  # eos of the tiny target
    assert draft.spec.extra["vocab"] == vocab.record() and len(vocab.digest) == 16
    assert vocab.digest in (tmp_path / "draft" / "README.md").read_text()
    assert 0 < res["val/top1_acc"] < 1
    full = new_draft(target, DraftConfig(), config(), None)
    assert res["draft_params"] == full.draft_params  # the frozen head is never a parameter


def test_training_starts_a_scylla_draft_of_any_depth_from_its_projection(target):
    """new_draft zeroes each layer's residual-branch output: the untrained draft's hidden is
    its fc projection, the zeroed weights still get gradients, and instantiate alone keeps
    random layers (the cache and mask tests need them)."""
    ids = torch.randint(3, 256, (2, 7))
    feats = target.model(ids).last_hidden
    draft = new_draft(target, DraftConfig(draft_n_layer=3), config(), None)
    out = draft(ids, feats)
    assert torch.equal(out.hidden, draft.project(ids, feats))
    out.hidden.square().sum().backward()
    for layer in draft.layers:
        assert layer.self_attn.o_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0
    random = instantiate(draft.spec, target)
    assert not torch.allclose(random(ids, feats).hidden, random.project(ids, feats))


def test_two_stages_pretrain_then_sft(target, shards, tmp_path):
    train, val = sources(shards)
    res = train_draft(target, DraftConfig(), config(train_tokens=1500, pretrain_tokens=3000),
                      train, val, tmp_path, progress=False)
    plan_steps = len(make_plan(train.lengths, 1500, 4, 1, 0, 3000).batches)
    assert res["steps"] == plan_steps > len(make_plan(train.lengths, 1500, 4, 1, 0).batches)


def test_online_mode_equals_training_on_fp32_shards(target, shards, tmp_path):
    cfg = config(train_tokens=1500, val_tokens=400)
    train, val = sources(shards, 1500, 400)
    offline = train_draft(target, DraftConfig(), cfg, train, val, tmp_path / "off",
                          progress=False)

    def examples(src):
        return [SimpleNamespace(input_ids=src.tokens(i)["input_ids"].numpy(),
                                loss_mask=src.tokens(i)["loss_mask"].numpy())
                for i in range(len(src))]

    online = train_draft(target, DraftConfig(), cfg, tokenized_source(examples(train)),
                         tokenized_source(examples(val)), tmp_path / "on",
                         features=online_features(target.model, ()), progress=False)
    a, b = weights(tmp_path / "off"), weights(tmp_path / "on")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)
    assert online["val/top1_acc"] == pytest.approx(offline["val/top1_acc"], abs=0.01)


def test_budget_beyond_the_shards_says_how_to_build_them(shards):
    with pytest.raises(DataError, match="extend it with `scylla hidden-states --build-tokens "
                                        "99999`"):
        shard_source(str(shards / "train"), 99999, "train_tokens", "--build-tokens")
    with pytest.raises(DataError, match="hidden-states --val-tokens 99999`"):
        shard_source(str(shards / "train"), 99999, "val_tokens", "--val-tokens")  # incomplete


# ---- a fixed vocabulary


def test_every_budget_gets_the_same_vocabulary(target, shards, tmp_path):
    vocab = fixed_vocab(tmp_path / "v.safetensors")
    pruned = DraftConfig(draft_vocab_size=64)
    maps = [vocab_map(shard_source(str(shards / "train"), n, "train_tokens", "--build-tokens"),
                      pruned, config(train_tokens=n), target, vocab) for n in (300, TRAIN)]
    assert torch.equal(maps[0], maps[1])
    budget = DraftConfig(draft_vocab_size=64, vocab="budget")  # the committed results' way
    small, large = (vocab_map(sources(shards, n)[0], budget, config(train_tokens=n), target)
                    for n in (300, TRAIN))
    assert not torch.equal(small, large)
    with pytest.raises(ConfigError, match="DraftConfig.vocab='corpus' needs"):
        vocab_map(sources(shards)[0], pruned, config(), target)


def test_vocabulary_file_round_trips_and_refuses_a_bad_file(tmp_path):
    path = tmp_path / "vocab.safetensors"
    vocab = fixed_vocab(path)
    back = load_vocab(path, "tiny", 256)
    assert torch.equal(back.counts, vocab.counts) and back.record() == vocab.record()
    with pytest.raises(DataError, match=rf"vocabulary file {path} was built for target 'tiny'"):
        load_vocab(path, "other", 256)
    with pytest.raises(DataError, match="with 256 tokens, not 'tiny' with 512"):
        load_vocab(path, "tiny", 512)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"vocabulary file {path}: cannot read it"):
        load_vocab(path, "tiny", 256)
    with pytest.raises(DataError, match="missing.safetensors: cannot read it"):
        load_vocab(tmp_path / "missing.safetensors", "tiny", 256)


# ---- a budget that accumulates


def test_continued_training_accumulates_unseen_slices(target, shards, tmp_path):
    train, val = sources(shards)
    cfg = config(train_tokens=1500, val_tokens=400)
    first = train_draft(target, DraftConfig(), cfg, train, val, tmp_path / "a", progress=False,
                        corpus="text")
    spec_a = load_draft(first["draft"], target).spec
    (a0, a, data), = spec_a.extra["slices"]
    assert data == "text"
    assert a0 == 0 and a >= 1500 and spec_a.extra["cumulative_tokens"] == a
    more = config(train_tokens=1000, val_tokens=400, init_from=str(tmp_path / "a"))
    # the continued run starts from the draft's weights
    start, seq0 = initial_draft(target, DraftConfig(), more, train, None, "text")
    saved = weights(tmp_path / "a")
    assert all(torch.equal(v, saved[k]) for k, v in start.state_dict().items() if k in saved)
    assert sum(train.lengths[:seq0]) == a
    second = train_draft(target, DraftConfig(), more, train, val, tmp_path / "b",
                         progress=False, corpus="text")
    spec_b = load_draft(second["draft"], target).spec
    (_, a1, _), (b0, b, _) = spec_b.extra["slices"]
    # validated before its new slice on the same text: where the first draft ended
    assert second["start/val/tau_chain"] == pytest.approx(first["val/tau_chain"])
    assert second["start/val/loss"] == pytest.approx(first["val/loss"])
    assert "start/val/loss" not in first
    assert a1 == b0 == a and b >= a + 1000
    assert spec_b.extra["cumulative_tokens"] == a + (b - a)
    # the second slice's sequences are disjoint from the first's
    plan_a = make_plan(train.lengths, 1500, 4, 1, 0)
    plan_b = make_plan(train.lengths, 1000, 4, 1, 0, first=seq0)
    seqs_a = {i.seq for bt in plan_a.batches for i in bt}
    seqs_b = {i.seq for bt in plan_b.batches for i in bt}
    assert seqs_a == set(range(seq0)) and not seqs_a & seqs_b and min(seqs_b) == seq0
    assert second["plan"] == plan_b.digest
    card = (tmp_path / "b" / "draft" / "README.md").read_text()
    assert "`start/val/tau_chain`" in card
    assert (f"[0, {a}) of text + [{a}, {b}) of text" in card
            and f"| `cumulative_tokens` | {b} |" in card)
    # other data (the target's own answers) has its own order: the draft starts it at 0, and
    # its record keeps both (a slice of two fields is of the draft's recorded corpus)
    from_b = config(train_tokens=1000, val_tokens=400, init_from=str(tmp_path / "b"))
    _, seq0 = initial_draft(target, DraftConfig(), from_b, train, None, "answers")
    assert seq0 == 0
    third = train_draft(target, DraftConfig(), from_b, train, val, tmp_path / "c",
                        progress=False, corpus="answers")
    extra_c = load_draft(third["draft"], target).spec.extra
    (c0, c, data_c) = extra_c["slices"][-1]
    assert extra_c["slices"][:2] == spec_b.extra["slices"] and (c0, data_c) == (0, "answers")
    assert extra_c["cumulative_tokens"] == b + c
    # refused: another target, another architecture
    with pytest.raises(DraftMismatchError, match="does not belong to target 'other'"):
        initial_draft(tiny_target("other"), DraftConfig(), more, train, None)
    with pytest.raises(ConfigError, match="draft_n_layer=1; it cannot continue as "
                                          "DraftConfig.draft_n_layer=2"):
        initial_draft(target, DraftConfig(draft_n_layer=2), more, train, None)


def test_a_trained_head_starts_as_the_targets_rows_learns_and_is_stored(target, shards,
                                                                        tmp_path):
    train, val = sources(shards)
    vocab = fixed_vocab(tmp_path / "vocab.safetensors")
    cfg = DraftConfig(draft_vocab_size=64, head="trained")
    start = new_draft(target, cfg, config(), vocab_map(train, cfg, config(), target, vocab))
    frozen = new_draft(target, DraftConfig(draft_vocab_size=64), config(),
                       vocab_map(train, cfg, config(), target, vocab))
    # it starts as the frozen head: the same rows, so the same logits
    assert torch.equal(start.lm_head.weight, start.target_head_weight)
    h = torch.randn(3, 64)
    torch.testing.assert_close(start.readout(h), frozen.readout(h))
    assert start.draft_params == frozen.draft_params + 64 * 64  # the head's rows are parameters
    res = train_draft(target, cfg, config(), train, val, tmp_path, progress=False, vocab=vocab)
    draft = load_draft(res["draft"], target)
    assert draft.spec.head == "trained" and "lm_head.weight" in weights(tmp_path)
    assert not torch.equal(draft.lm_head.weight, draft.target_head_weight)  # it was trained
    assert "lm_head.weight" not in weights_of_frozen(target, shards, tmp_path / "f", vocab)
    # a draft continues only with the head it has
    more = config(train_tokens=1000, init_from=str(tmp_path))
    with pytest.raises(ConfigError, match="head='trained'; it cannot continue as "
                                          "DraftConfig.head='target'"):
        initial_draft(target, DraftConfig(draft_vocab_size=64), more, train, None)
    with pytest.raises(ConfigError, match="DraftConfig.head='own'"):
        DraftConfig(head="own")
    with pytest.raises(ConfigError, match="DraftConfig.head='trained'"):
        DraftConfig(kind="eagle3", head="trained")


def weights_of_frozen(target, shards, out, vocab):
    train, val = sources(shards, train=1000, val=400)
    train_draft(target, DraftConfig(draft_vocab_size=64), config(train_tokens=1000,
                val_tokens=400), train, val, out, progress=False, vocab=vocab)
    return weights(out)


def test_top_k_distillation_sums_the_cross_entropy_over_the_targets_top_k_tokens(target):
    torch.manual_seed(0)
    draft = new_draft(target, DraftConfig(), config(), None)
    ids = torch.randint(3, 256, (2, 10))
    out = target.model(ids)
    mask = torch.ones(2, 10)
    hiddens = unroll(draft, ids, out.last_hidden, 1)
    args = (draft, hiddens, out.last_hidden, mask, 0.0, 1.0, 1.0)  # CE alone
    full = objective(*args).loss
    top = objective(*args, top_k=5).loss
    # by hand: -sum over the target's 5 most likely tokens of p log q, mean over rows
    h = hiddens[0][:, :8].flatten(0, 1)  # rows t predict t+2: 8 of 10 positions per sequence
    p = torch.softmax(draft.target_logits(out.last_hidden[:, 1:9].flatten(0, 1)).float(), -1)
    logq = torch.log_softmax(draft.readout(h).float(), -1)
    probs, k = p.topk(5, -1)
    by_hand = -(probs * logq.gather(-1, k)).sum(-1).mean()
    torch.testing.assert_close(top, by_hand)
    assert 0 < top < full  # fewer (non-negative) terms
    assert objective(*args, top_k=256).loss == full  # K = the vocabulary: the full CE
    res = objective(*args, top_k=5)
    res.loss.backward()
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="TrainConfig.distill_top_k=-1"):
        config(distill_top_k=-1)
