"""Prompt loading: Spec-Bench, plain prompt JSONL, held-out ShareGPT; rendering to ids."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

import scylla
from scylla.data.prompts import (
    Prompt,
    load_prompts,
    prompt_file,
    prompt_ids,
    prompts_from,
    sharegpt_prompts,
    spread_over_categories,
)
from scylla.data.sharegpt import load_sharegpt
from scylla.data.split import is_validation
from scylla.errors import DataError
from scylla.modeling.targets import load_tokenizer

SPEC_BENCH = "spec-bench"  # shipped inside the package (scylla/data/spec_bench)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_spec_bench_ships_in_the_package_with_480_prompts_in_13_categories():
    assert prompt_file(SPEC_BENCH).is_relative_to(Path(scylla.__file__).parent)
    assert (prompt_file(SPEC_BENCH).parent / "README.md").read_text().count("Apache") == 1
    prompts = load_prompts(SPEC_BENCH)
    counts = collections.Counter(p.category for p in prompts)
    assert len(prompts) == 480 and len(counts) == 13
    assert counts["translation"] == 80 and counts["writing"] == 10
    assert prompts[0].id == "81" and len(prompts[0].turns) == 2


def test_num_prompts_is_spread_over_the_categories():
    forty = load_prompts(SPEC_BENCH, num_prompts=40)
    counts = collections.Counter(p.category for p in forty)
    assert len(counts) == 13 and sorted(counts.values()) == [3] * 12 + [4]
    assert counts["writing"] == 4  # the first category in the file gets the extra one
    assert {p.id for p in forty} < {p.id for p in load_prompts(SPEC_BENCH, num_prompts=41)}
    assert forty == load_prompts(SPEC_BENCH, num_prompts=40)  # deterministic
    qa = load_prompts(SPEC_BENCH, num_prompts=5, categories=["qa", "rag"])
    assert [p.category for p in qa].count("qa") == 3 and len(qa) == 5
    with pytest.raises(DataError, match=r"no prompts of categories \['poetry'\]"):
        load_prompts(SPEC_BENCH, categories=["poetry"])
    with pytest.raises(DataError, match="num_prompts=481: only 480 prompts"):
        load_prompts(SPEC_BENCH, num_prompts=481)


def test_round_robin_when_categories_run_out():
    ps = [Prompt(str(i), c, ["x"]) for i, c in enumerate("aaaaabc")]
    assert [p.id for p in spread_over_categories(ps, 5)] == ["0", "1", "2", "5", "6"]


def test_plain_prompt_files(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Say hi."},
        {"text": "Count to 3.", "category": "math", "id": 7},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]},
    ])
    ps = load_prompts(f)
    assert ps == [Prompt("mine:1", "default", ["Say hi."]), Prompt("7", "math", ["Count to 3."]),
                  Prompt("mine:3", "default", ["Q1", "Q2"])]
    assert prompts_from(f, num_prompts=2) == [ps[0], ps[1]]


def test_bad_prompt_files_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: no such file"):
        load_prompts(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load_prompts(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON line"):
        load_prompts(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, '{"prompt": "x"']))
    with pytest.raises(DataError, match=r"blank.jsonl:1: empty prompt"):
        load_prompts(write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}]))
    with pytest.raises(DataError, match=r"other.jsonl:1: no prompt: expected 'turns'"):
        load_prompts(write_jsonl(tmp_path / "other.jsonl", [{"question": "?"}]))
    with pytest.raises(DataError, match=r"turns.jsonl:1: the turns must be a list of strings"):
        load_prompts(write_jsonl(tmp_path / "turns.jsonl", [{"turns": "just a string"}]))


def test_sharegpt_prompts_are_held_out_first_user_turns():
    ps = sharegpt_prompts(limit=2000)
    convs = {c.id: c for c in load_sharegpt(limit=2000)}
    assert 40 < len(ps) < 200
    for p in ps:
        assert is_validation(convs[p.id].group)
        assert p.turns == [convs[p.id].user_turns()[0]] and len(p.turns[0]) <= 2000
        assert p.category == "sharegpt"
    assert sharegpt_prompts(10, limit=2000) == ps[:10]
    with pytest.raises(DataError, match="num_prompts=5000: only"):
        sharegpt_prompts(5000, limit=2000)


@pytest.mark.real
def test_prompt_ids_render_the_user_turn_with_the_generation_prompt():
    tok = load_tokenizer("smollm2-135m-instruct")
    p = Prompt("1", "x", ["Why is the sky blue?", "And the sea?"])
    ids = prompt_ids(tok, p)
    want = tok.apply_chat_template([{"role": "user", "content": p.turns[0]}], tokenize=True,
                                   add_generation_prompt=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert tok.decode(ids).endswith("Why is the sky blue?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tok, "Why is the sky blue?") == ids
    assert tok.decode(prompt_ids(tok, p, turn=1)).count("And the sea?") == 1
    with pytest.raises(DataError, match="prompt 'e': empty text"):
        prompt_ids(tok, Prompt("e", "x", [" "]))
