"""Conversation normalisation and user JSONL files of conversations, including bad input."""
from __future__ import annotations

import collections
import json

import pytest

from scylla.data.conversations import Conversation, clean_messages, load_conversations
from scylla.errors import DataError


def sg(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


def roles(messages):
    return [m["role"] for m in messages]


def test_roles_are_mapped_and_a_leading_system_message_kept():
    out, reason = clean_messages(sg(("system", "be nice"), ("human", "q"), ("chatgpt", "a"),
                                    ("user", "q2"), ("bard", "a2"), ("HUMAN", "q3"),
                                    ("bing", "a3")))
    assert reason is None
    assert roles(out) == ["system"] + ["user", "assistant"] * 3
    assert out[2] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("raw, kept", [
    # a ShareGPT chunk opening with the reply to a question of the previous chunk
    (sg(("gpt", "a0"), ("human", "q"), ("gpt", "a")), ["q", "a"]),
    # two user turns in a row: the valid prefix ends before the second
    (sg(("human", "q"), ("gpt", "a"), ("human", "q2"), ("human", "q3"), ("gpt", "a3")),
     ["q", "a"]),
    # a blank message ends the prefix; the unanswered user turn goes too
    (sg(("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "  "), ("human", "x")),
     ["q", "a"]),
    # a system message after the start ends the prefix
    (sg(("human", "q"), ("gpt", "a"), ("system", "s"), ("human", "q2"), ("gpt", "a2")),
     ["q", "a"]),
])
def test_the_longest_valid_prefix_is_kept(raw, kept):
    out, reason = clean_messages(raw)
    assert reason is None
    assert [m["content"] for m in out] == kept


@pytest.mark.parametrize("raw, reason", [
    ([], "no messages"),
    (sg(("gpt", "only a reply")), "no user->assistant exchange"),
    (sg(("human", "unanswered")), "no user->assistant exchange"),
    (sg(("human", ""), ("gpt", "a")), "no user->assistant exchange"),
    (sg(("human", "q"), ("tool", "t")), "unknown role 'tool'"),
    ([{"from": "human"}], "malformed message"),
    (["not a dict"], "malformed message"),
])
def test_records_without_an_exchange_are_dropped_with_a_reason(raw, reason):
    assert clean_messages(raw) == ([], reason)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_jsonl_in_both_layouts(tmp_path):
    f = write_jsonl(tmp_path / "chats.jsonl", [
        {"id": "x1", "conversations": sg(("human", "q"), ("gpt", "a"))},
        "",
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"id": "x1", "messages": [{"role": "user", "content": "dup"},
                                  {"role": "assistant", "content": "dup"}]},
        {"id": "bad", "messages": [{"role": "user", "content": "no reply"}]},
    ])
    dropped = collections.Counter()
    convs = load_conversations(f, dropped)
    assert [c.id for c in convs] == ["x1", "chats:3"]
    assert roles(convs[1]) == ["system", "user", "assistant"]
    assert convs[0].group == "x1" and convs[1].user_turns() == ["q"]
    assert dropped == {"duplicate id": 1, "no user->assistant exchange": 1}
    assert Conversation.from_json(json.loads(json.dumps(convs[1].to_json()))) == convs[1]


def test_bad_conversation_files_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_conversations(tmp_path / "missing.jsonl")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load_conversations(empty)
    malformed = write_jsonl(tmp_path / "m.jsonl", [{"messages": []}, '{"messages": [}'])
    with pytest.raises(DataError, match=r"m.jsonl:2: malformed JSON line"):
        load_conversations(malformed)
    not_object = write_jsonl(tmp_path / "n.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"n.jsonl:1: expected a JSON object, got list"):
        load_conversations(not_object)
    no_list = write_jsonl(tmp_path / "k.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"k.jsonl:1: expected a list under 'conversations'"):
        load_conversations(no_list)
    useless = write_jsonl(tmp_path / "u.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match="u.jsonl: no usable conversation"):
        load_conversations(useless)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"messages": []}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8"):
        load_conversations(binary)
