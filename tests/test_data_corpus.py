"""Tokenized corpora: fixed order, nested token budgets, chunked disk cache, resume, errors."""
from __future__ import annotations

import numpy as np
import pytest

from scylla.data import corpus as corpus_mod
from scylla.data.chat_tokens import tokenize_conversation
from scylla.data.conversations import Conversation
from scylla.data.corpus import TokenizedCorpus, load_corpus
from scylla.data.split import split_conversations
from scylla.errors import DataError
from scylla.modeling.targets import load_tokenizer

pytestmark = pytest.mark.real  # the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


def make_convs(n):
    rng = np.random.default_rng(0)
    convs = []
    for i in range(n):
        turns = int(rng.integers(1, 4))
        msgs = []
        for t in range(turns):
            msgs.append({"role": "user", "content": f"question {t} of conversation {i}?"})
            msgs.append({"role": "assistant",
                         "content": " ".join(["answer"] * int(rng.integers(1, 30)))})
        convs.append(Conversation(id=f"c{i}", messages=tuple(msgs)))
    return convs


@pytest.fixture
def corpus(tok, tmp_path):
    def build(convs=None, **kw):
        kw.setdefault("max_len", 128)
        kw.setdefault("chunk_size", 8)
        kw.setdefault("progress", False)
        return TokenizedCorpus(tok, make_convs(50) if convs is None else convs,
                               cache_root=tmp_path / "cache", **kw)
    return build


def test_examples_match_tokenize_conversation_in_a_seeded_order(corpus, tok):
    convs = make_convs(50)
    c = corpus(convs)
    examples = list(c.examples())
    assert sorted(e.conv_id for e in examples) == sorted(x.id for x in convs)
    assert [e.conv_id for e in examples] != [x.id for x in convs]  # shuffled
    assert [e.conv_id for e in corpus(convs).examples()] == [e.conv_id for e in examples]
    assert [e.conv_id for e in corpus(convs, shuffle_seed=1).examples()] != \
        [e.conv_id for e in examples]
    by_id = {x.id: x for x in convs}
    for e in examples[:5]:
        ids, mask = tokenize_conversation(tok, by_id[e.conv_id], 128)
        assert e.input_ids.tolist() == ids and e.loss_mask.tolist() == mask
        assert e.input_ids.dtype == np.int32 and e.loss_mask.dtype == np.uint8


def test_budgets_are_shortest_prefixes_and_nested(corpus):
    c = corpus()
    cum = c.cumulative_tokens()
    for budget in (1, 100, int(cum[10]), int(cum[10]) + 1, 1500, int(cum[-1])):
        taken = c.take_tokens(budget)
        n = len(taken)
        assert cum[n - 1] >= budget and (n == 1 or cum[n - 2] < budget)
    small, large = c.take_tokens(500), c.take_tokens(2000)
    assert [e.conv_id for e in large[:len(small)]] == [e.conv_id for e in small]
    with pytest.raises(DataError, match=f"train_tokens={int(cum[-1]) + 1} exceeds the "
                                        f"{int(cum[-1])} tokens"):
        c.take_tokens(int(cum[-1]) + 1)
    with pytest.raises(DataError, match="train_tokens=0"):
        c.take_tokens(0)


def test_small_budgets_tokenize_only_the_chunks_they_need(corpus):
    c = corpus()
    c.take_tokens(10)
    assert c.is_cached(0) and not any(c.is_cached(k) for k in range(1, c.num_chunks))


def test_cache_is_reused_and_keyed(corpus, monkeypatch):
    first = corpus()
    stats = first.stats()
    assert stats["conversations"] == 50 and stats["skipped"] == 0
    assert 0 < stats["loss_tokens"] < stats["tokens"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(corpus_mod, "tokenize_rendered", no_tokenizing)
    again = corpus()
    assert again.dir == first.dir and again.stats() == stats
    assert all(np.array_equal(a.input_ids, b.input_ids)
               for a, b in zip(again.examples(), first.examples()))
    assert corpus(max_len=64).dir != first.dir
    assert corpus(make_convs(49)).dir != first.dir


def test_a_killed_build_resumes_and_a_corrupt_chunk_is_named(corpus):
    c = corpus()
    c.take_tokens(10)
    (c.dir / "chunk-00001.999.partial.npz").write_bytes(b"half written")  # a killed write
    resumed = corpus()
    assert len(list(resumed.examples())) == 50
    good = c.chunk_path(2).read_bytes()
    for bad in (b"not an npz", good[:len(good) // 2]):  # garbage, a cut-off zip
        c.chunk_path(2).write_bytes(bad)
        with pytest.raises(DataError, match="chunk-00002.npz: corrupt tokenized chunk"):
            list(corpus().examples())


def test_conversations_without_loss_tokens_after_the_cut_are_skipped(corpus):
    long_question = Conversation(id="long", messages=(
        {"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}))
    c = corpus(make_convs(10) + [long_question], chunk_size=4)
    assert c.stats()["skipped"] == 1
    assert "long" not in {e.conv_id for e in c.examples()}
    assert all(e.loss_mask.any() and len(e.input_ids) <= 128 for e in c.examples())


def test_load_corpus_gives_disjoint_splits(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(tmp_path))
    convs = make_convs(60)
    train = load_corpus(tok, 128, "train", convs, val_fraction=0.25, progress=False)
    val = load_corpus(tok, 128, "val", convs, val_fraction=0.25, progress=False)
    val_ids = [e.conv_id for e in val.examples()]
    assert val_ids == [c.id for c in split_conversations(convs, "val", 0.25)]  # file order
    assert not set(val_ids) & {e.conv_id for e in train.examples()}
    assert len(val_ids) + train.stats()["conversations"] == 60
    assert str(train.dir).startswith(str(tmp_path / "corpora" / "tokenized"))
    with pytest.raises(DataError, match="split 'val' of 60 conversations is empty"):
        load_corpus(tok, 128, "val", convs, val_fraction=0.0)
