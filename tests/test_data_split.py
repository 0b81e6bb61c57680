"""Train / validation split: stable across processes and machines, nested, grouped."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scylla.data.conversations import Conversation
from scylla.data.split import split_conversations, split_ids, stable_fraction
from scylla.errors import DataError

IDS = [f"conv-{i}" for i in range(4000)]


def test_hash_is_pinned():
    # sha256-based values: the same on every machine and Python version
    assert stable_fraction("QWJhYvA") == pytest.approx(0.14196219022609427, abs=1e-15)
    assert stable_fraction("conversation-1") == pytest.approx(0.2546437906087053, abs=1e-15)


def test_split_is_the_same_in_a_fresh_process():
    # Python's own hash() of a str is salted per process; ours must not be
    code = ("from scylla.data.split import split_ids; "
            "print(','.join(split_ids([f'conv-{i}' for i in range(4000)], 0.1)[1]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert out.split(",") == split_ids(IDS, 0.1)[1]


def test_fraction_order_and_nesting():
    train, val = split_ids(IDS, 0.1)
    assert sorted(train + val) == sorted(IDS) and not set(train) & set(val)
    assert 0.08 < len(val) / len(IDS) < 0.12
    assert val == [i for i in IDS if i in set(val)]  # input order kept
    assert set(split_ids(IDS, 0.05)[1]) < set(val)  # a smaller fraction is a subset
    assert split_ids(IDS, 0.0)[1] == [] and split_ids(IDS, 1.0)[0] == []
    with pytest.raises(DataError, match="val_fraction=1.5"):
        split_ids(IDS, 1.5)


def test_chunks_of_one_chat_share_a_split():
    convs = [Conversation(id=f"chat{i}_{k}", messages=(), group=f"chat{i}")
             for i in range(300) for k in range(3)]
    val = split_conversations(convs, "val", 0.2)
    train = split_conversations(convs, "train", 0.2)
    assert len(val) + len(train) == len(convs) and val
    assert not {c.group for c in val} & {c.group for c in train}
    assert all(sum(c.group == g for c in val) == 3 for g in {c.group for c in val})
    with pytest.raises(DataError, match="split='test'"):
        split_conversations(convs, "test")
