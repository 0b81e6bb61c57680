"""Hidden-state shards: content, manifest, budgets as prefixes, kill-and-resume, corruption."""
from __future__ import annotations

import json

import pytest
import torch
from drafts_fixtures import header, synthetic_examples, tiny_target

from scylla.data.hidden_states import build_shards, forward_batches
from scylla.data.shards import ShardReader, budget_prefix, load_manifest
from scylla.errors import DataError

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def examples():
    return synthetic_examples(60)


def build(target, examples, directory, stop, **kw):
    kw.setdefault("tokens_per_shard", 400)
    kw.setdefault("batch_tokens", 300)
    return build_shards(target.model, iter(examples), directory, header(target, LAYERS), stop,
                        layers=LAYERS, progress=False, **kw)


def test_shards_hold_the_targets_features_in_order(target, examples, tmp_path):
    res = build(target, examples, tmp_path, 1000, hidden_dtype="float32")
    m = load_manifest(tmp_path)
    assert res["total_tokens"] == m.total_tokens >= 1000 and len(m.shards) == res["shards"] >= 3
    lengths = [len(e[0]) for e in examples]
    assert [n for s in m.shards for n in s.lengths] == lengths[:m.total_sequences]
    cum = 0
    for s in m.shards:
        cum += sum(s.lengths)
        assert s.cum_tokens == cum and s.tokens >= 400 or s is m.shards[-1]
        assert len(s.sha256) == 64
    reader = ShardReader(tmp_path)
    for i in (0, 7, m.total_sequences - 1):
        ids, mask = examples[i]
        row = reader[i]
        assert row["input_ids"].tolist() == ids.tolist()
        assert row["loss_mask"].tolist() == mask.tolist()
        ref = target.model(torch.as_tensor(ids, dtype=torch.long)[None], hidden_layers=LAYERS)
        # the build runs padded batches of thousands of rows, the reference one sequence: the
        # GEMM kernels block them differently, so their fp32 rounding differs (~1e-5)
        close = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row["last_hidden"], ref.last_hidden[0], **close)
        for j in LAYERS:
            torch.testing.assert_close(row[f"hidden.{j}"], ref.hidden[j][0], **close)
    assert not torch.equal(reader[0]["hidden.1"], reader[0]["hidden.3"])


def test_bf16_is_the_default_storage(target, examples, tmp_path):
    build(target, examples, tmp_path, 100)
    row = ShardReader(tmp_path)[0]
    assert row["last_hidden"].dtype == torch.bfloat16 and row["input_ids"].dtype == torch.int32
    assert load_manifest(tmp_path).header["layers"] == list(LAYERS)


def test_budget_is_the_shortest_prefix_and_smaller_budgets_are_nested(target, examples,
                                                                      tmp_path):
    build(target, examples, tmp_path, 2000)
    m = load_manifest(tmp_path)
    lengths = [n for s in m.shards for n in s.lengths]
    for budget in (1, lengths[0], lengths[0] + 1, 777, 1500, m.total_tokens):
        n, tokens = budget_prefix(m, budget)
        assert tokens == sum(lengths[:n]) >= budget and sum(lengths[:n - 1]) < budget
    assert budget_prefix(m, m.total_tokens + 1) == (len(lengths), m.total_tokens)


def test_killed_build_resumes_after_its_last_complete_shard(target, examples, tmp_path):
    whole = tmp_path / "whole"
    build(target, examples, whole, 2000)

    def kill_after_two(info):
        if info.file == "shard-00001.safetensors":
            raise KeyboardInterrupt("killed")

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build(target, examples, killed, 2000, on_shard=kill_after_two)
    assert len(load_manifest(killed).shards) == 2
    # a half-written shard of the killed attempt lies around; it is never listed nor used
    (killed / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    res = build(target, examples, killed, 2000)
    assert res["tokens_built"] == res["total_tokens"] - load_manifest(killed).shards[1].cum_tokens
    a, b = load_manifest(whole), load_manifest(killed)
    assert [(s.file, s.sha256, s.lengths) for s in a.shards] == \
        [(s.file, s.sha256, s.lengths) for s in b.shards]


def test_a_larger_budget_extends_the_directory_to_the_same_shards(target, examples, tmp_path):
    build(target, examples, tmp_path / "a", 600)
    small = load_manifest(tmp_path / "a")
    res = build(target, examples, tmp_path / "a", 2500)
    assert res["tokens_built"] > 0
    build(target, examples, tmp_path / "b", 2500)
    grown, fresh = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert [s.sha256 for s in grown.shards] == [s.sha256 for s in fresh.shards]
    assert [s.sha256 for s in small.shards] == [s.sha256 for s in grown.shards[:len(small.shards)]]
    assert build(target, examples, tmp_path / "a", 2500)["tokens_built"] == 0


def test_corpus_end_marks_the_build_complete(target, examples, tmp_path):
    res = build(target, examples[:5], tmp_path, 10**9)
    m = load_manifest(tmp_path)
    assert res["complete"] and m.complete
    assert m.total_tokens == sum(len(e[0]) for e in examples[:5])


def test_corrupt_or_missing_shards_are_named(target, examples, tmp_path):
    build(target, examples, tmp_path, 1000)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors is corrupt"):
        ShardReader(tmp_path)
    with pytest.raises(DataError, match=r"shard-00001\.safetensors is corrupt"):
        build(target, examples, tmp_path, 3000)  # never extends a corrupt directory
    ShardReader(tmp_path, num_sequences=1)  # a budget inside shard 0 does not need shard 1
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-00001\.safetensors is missing"):
        ShardReader(tmp_path)


def test_a_different_build_never_mixes_into_a_directory(target, examples, tmp_path):
    build(target, examples, tmp_path, 500)
    with pytest.raises(DataError, match="another build"):
        build_shards(target.model, iter(examples), tmp_path, header(target, ()), 500,
                     progress=False)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a scylla hidden-state manifest"):
        load_manifest(tmp_path)


def test_forward_batches_respect_the_token_budget():
    lengths = [5, 50, 20, 20, 7, 49]
    batches = forward_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
