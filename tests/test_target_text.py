"""Shards of the target's own answers (``scylla hidden-states --answers target``): features of
one full forward, greedy answers = plain decoding, answer-only masks, resume, config errors, and
the existing draft training reading the shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoding_fixtures import EOS, prompts_of, tiny_target
from drafts_fixtures import header, tiny_hf

from scylla.commands.cli import main
from scylla.config import TrainConfig
from scylla.data.hidden_states import HiddenStatesConfig, build_header, shard_root
from scylla.data.shards import ShardReader, load_manifest
from scylla.data.target_text import AnswerPrompt, build_answer_shards, generate_answers
from scylla.decoding.plain import plain_decode
from scylla.drafts.train import online_sources
from scylla.errors import ConfigError, DataError

LAYERS = (1, 2)
MAX_LEN, NEW = 64, 30  # prompts of 3..42 tokens: some answers end by EOS, some by either cap
VOCAB = 96


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def make_prompts(n: int = 24, seed: int = 1) -> list[AnswerPrompt]:
    ids = prompts_of([3 + (7 * i) % 40 for i in range(n)], VOCAB, seed)
    return [AnswerPrompt(f"c{i}", p) for i, p in enumerate(ids)]


def build(target, directory, prompts, stop=10**9, **kw):
    kw = {"tokens_per_shard": 300, "batch_size": 5, "max_seq_len": MAX_LEN,
          "max_new_tokens": NEW, "eos_token_ids": [EOS], "layers": LAYERS,
          "progress": False, **kw}
    head = header(target, LAYERS)
    return build_answer_shards(target.model, iter(prompts), directory, head, stop, **kw)


def sequences(directory):
    reader = ShardReader(directory)
    return [reader[i] for i in range(len(reader))]


def cap(prompt: AnswerPrompt) -> int:
    return min(NEW, MAX_LEN - len(prompt.ids))


def assert_features_match(row, model, scale_tol=1e-4):
    """Stored features vs one cache-less forward over the stored sequence. The residual stream
    of this random target reaches |x| ~ 90 where fp32 rounding of a cached vs an uncached
    forward differs by ~2e-4, so the bound is 1e-4 of each tensor's largest magnitude
    (measured worst: 3e-6 of it); a feature from a wrong position is off by O(1)."""
    with torch.inference_mode():
        full = model(row["input_ids"].long()[None], hidden_layers=LAYERS)
    refs = {"last_hidden": full.last_hidden[0],
            **{f"hidden.{i}": full.hidden[i][0] for i in LAYERS}}
    for name, ref in refs.items():
        torch.testing.assert_close(row[name], ref, rtol=0,
                                   atol=scale_tol * float(ref.abs().max()))
    return full.logits[0].argmax(-1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_features_are_those_of_one_forward_over_the_stored_sequence(target, tmp_path,
                                                                    temperature):
    prompts = make_prompts()
    res = build(target, tmp_path, prompts, temperature=temperature, hidden_dtype="float32",
                store_argmax=True)
    m = load_manifest(tmp_path)
    assert res["complete"] and m.complete and len(m.shards) >= 3
    assert res["answers"] == m.total_sequences == len(prompts)
    rows = sequences(tmp_path)
    for p, row in zip(prompts, rows):
        assert row["input_ids"][:len(p.ids)].tolist() == p.ids  # the order, each prompt once
        argmax = assert_features_match(row, target.model)
        assert row["target_argmax"].tolist() == argmax.tolist()
        assert row["last_hidden"].shape == (len(row["input_ids"]), 64)


def test_greedy_answers_are_what_plain_decoding_writes(target, tmp_path):
    prompts = make_prompts()
    build(target, tmp_path, prompts)
    ref = plain_decode(target.model, [p.ids for p in prompts], NEW, [EOS]).tokens
    ends = set()
    for p, row, want in zip(prompts, sequences(tmp_path), ref):
        answer = row["input_ids"][len(p.ids):].tolist()
        assert answer == want[:cap(p)]
        ends.add("eos" if answer[-1] == EOS else
                 "max_new_tokens" if len(answer) == NEW else "max_seq_len")
    assert ends == {"eos", "max_new_tokens", "max_seq_len"}  # the test covers every way out


def test_the_mask_covers_the_answer_and_nothing_else(target, tmp_path):
    prompts = make_prompts(12)
    at_limit = [AnswerPrompt("one", [1] + [5] * (MAX_LEN - 2)),  # room for one answer token
                AnswerPrompt("none", [1] + [5] * (MAX_LEN - 1))]  # no room: skipped
    res = build(target, tmp_path, prompts[:6] + at_limit + prompts[6:])
    assert res["prompts_skipped"] == 1 and res["answers"] == 13
    kept = prompts[:6] + at_limit[:1] + prompts[6:]
    rows = sequences(tmp_path)
    assert len(rows) == len(kept)
    for p, row in zip(kept, rows):
        n, total = len(p.ids), len(row["input_ids"])
        assert row["loss_mask"].tolist() == [0] * n + [1] * (total - n)
        assert 1 <= total - n <= cap(p) and total <= MAX_LEN
        answer = row["input_ids"][n:].tolist()
        assert EOS not in answer[:-1]  # EOS ends an answer and is kept as its last token
        assert answer[-1] == EOS or len(answer) == cap(p)
    assert len(rows[6]["input_ids"]) == MAX_LEN


def test_rows_do_not_depend_on_the_batch(target):
    prompts = make_prompts(14)
    kw = {"max_seq_len": MAX_LEN, "max_new_tokens": NEW, "eos_token_ids": [EOS],
          "hidden_dtype": "float32"}
    for temperature in (0.0, 0.8):
        runs = [list(generate_answers(target.model, iter(prompts), temperature=temperature,
                                      seed=3, batch_size=b, **kw)) for b in (1, 4, 32)]
        for rows in runs[1:]:
            assert [r.id for r in rows] == [p.id for p in prompts]
            assert [r.input_ids.tolist() for r in rows] == \
                [r.input_ids.tolist() for r in runs[0]]
            for a, b in zip(rows, runs[0]):
                torch.testing.assert_close(a.features["last_hidden"], b.features["last_hidden"],
                                           atol=1e-4, rtol=0)


def test_sampled_answers_follow_their_seed(target):
    prompts = make_prompts(10)
    kw = {"max_seq_len": MAX_LEN, "max_new_tokens": NEW, "eos_token_ids": [EOS], "batch_size": 4}

    def answers(**extra):
        return [r.input_ids.tolist() for r in generate_answers(target.model, iter(prompts),
                                                               **kw, **extra)]

    greedy, s0 = answers(), answers(temperature=1.0, seed=0)
    assert answers(temperature=1.0, seed=0) == s0
    assert answers(temperature=1.0, seed=1) != s0 and s0 != greedy
    # a row's draws come from its conversation's own generator: the rows before it do not
    # matter (a resumed build decodes the same answers)
    later = [r.input_ids.tolist() for r in generate_answers(
        target.model, iter(prompts[5:]), temperature=1.0, seed=0, **kw)]
    assert later == s0[5:]


def test_a_killed_build_resumes_without_decoding_a_conversation_twice(target, tmp_path):
    prompts = make_prompts(30)
    whole = build(target, tmp_path / "whole", prompts)

    def kill_after_two(info):
        if info.file == "shard-00001.safetensors":
            raise KeyboardInterrupt("killed")

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build(target, killed, prompts, on_shard=kill_after_two)
    done = load_manifest(killed)
    assert len(done.shards) == 2 and not done.complete
    (killed / "shard-00002.safetensors.tmp").write_bytes(b"partial")  # never listed nor read
    res = build(target, killed, prompts, batch_size=3)  # another batch size: same sequences
    assert res["tokens_built"] == res["total_tokens"] - done.shards[1].cum_tokens
    assert res["answers"] == len(prompts) - done.total_sequences  # none decoded twice
    a, b = load_manifest(tmp_path / "whole"), load_manifest(killed)
    assert [s.lengths for s in a.shards] == [s.lengths for s in b.shards]
    assert whole["total_tokens"] == b.total_tokens and b.complete
    for x, y, p in zip(sequences(tmp_path / "whole"), sequences(killed), prompts, strict=True):
        assert x["input_ids"].tolist() == y["input_ids"].tolist()
        assert y["input_ids"][:len(p.ids)].tolist() == p.ids
        torch.testing.assert_close(x["last_hidden"], y["last_hidden"])  # bf16: equal here
    assert build(target, killed, prompts)["tokens_built"] == 0


def test_budgets_stop_at_a_shard_and_extend_the_same_directory(target, tmp_path):
    prompts = make_prompts(30)
    small = build(target, tmp_path, prompts, stop=500)
    m = load_manifest(tmp_path)
    assert 500 <= m.total_tokens and m.shards[-2].cum_tokens < 500 and not small["complete"]
    build(target, tmp_path, prompts, stop=1200)
    grown = load_manifest(tmp_path)
    assert [s.sha256 for s in grown.shards[:len(m.shards)]] == [s.sha256 for s in m.shards]
    assert grown.total_tokens >= 1200


def test_a_changed_corpus_is_not_resumed(target, tmp_path):
    prompts = make_prompts(30)
    build(target, tmp_path, prompts, stop=500)
    changed = [AnswerPrompt(p.id, p.ids[:-1] + [7]) for p in prompts]
    with pytest.raises(DataError, match="not the one its shards were built from"):
        build(target, tmp_path, changed)
    with pytest.raises(DataError, match="fewer conversations than"):
        build(target, tmp_path, prompts[:1])


def test_bad_settings_name_their_field():
    with pytest.raises(ConfigError, match=r"HiddenStatesConfig\.answers='greedy'"):
        HiddenStatesConfig(answers="greedy")
    with pytest.raises(ConfigError, match=r"answer_temperature=0\.7: only with answers='target'"):
        HiddenStatesConfig(answer_temperature=0.7)
    with pytest.raises(ConfigError, match=r"answer_temperature=-1"):
        HiddenStatesConfig(answers="target", answer_temperature=-1)
    with pytest.raises(ConfigError, match=r"answer_max_new_tokens=0"):
        HiddenStatesConfig(answers="target", answer_max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"answer_batch_size=0"):
        HiddenStatesConfig(answers="target", answer_batch_size=0)


def test_cli_reports_a_bad_answers_mode(capsys):
    assert main(["hidden-states", "--answers", "sampled", "--no-mlflow"]) == 2
    assert "HiddenStatesConfig.answers='sampled': one of ('corpus', 'target')" in \
        capsys.readouterr().err


def test_the_answers_name_the_shard_directory_and_header(target, monkeypatch, tmp_path):
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(tmp_path))
    text = HiddenStatesConfig()
    greedy = HiddenStatesConfig(answers="target")
    sampled = HiddenStatesConfig(answers="target", answer_temperature=0.7, answer_seed=2)
    names = [shard_root(c, target, "corpuskey", ()).name for c in (text, greedy, sampled)]
    assert names == ["corpuskey-bfloat16", "corpuskey-target-greedy-n512-bfloat16",
                     "corpuskey-target-t0.7-s2-n512-bfloat16"]
    # a corpus build's header is what it was, so existing shard directories still resume
    assert "answers" not in build_header(target, "k", "train", text, ())
    h = build_header(target, "k", "train", sampled, ())
    assert (h["answers"], h["answer_temperature"], h["answer_seed"]) == ("target", 0.7, 2)
    assert "answer_seed" not in build_header(target, "k", "train", greedy, ())


# ---------------------------------------------------------------------------------------------
# end to end: `scylla hidden-states --answers target`, then `scylla train --shards` on it


@pytest.mark.real  # the SmolLM2 tokenizer (the target itself is tiny and random)
def test_the_stage_writes_shards_that_training_reads(tmp_path, monkeypatch, capsys):
    from scylla.data.hidden_states import open_corpus
    from scylla.data.prompts import prompt_ids
    from scylla.modeling.targets import load_tokenizer

    monkeypatch.setenv("SCYLLA_DATA_DIR", str(tmp_path / "data"))
    tok = load_tokenizer("smollm2-135m-instruct")
    hf = tiny_hf(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    hf.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": f"c{i}", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": f"Tell me story number {i}."},
        {"from": "gpt", "value": "Once upon a time."},
        {"from": "human", "value": "Another one."},
        {"from": "gpt", "value": "The end."}]}) + "\n" for i in range(80)))
    shards = tmp_path / "shards"
    common = ["--target", str(tmp_path / "target"), "--corpus", str(chats), "--max-seq-len",
              "64", "--shards", str(shards), "--answers", "target", "--no-mlflow",
              "--no-progress"]
    assert main(["hidden-states", *common, "--answer-max-new-tokens", "12", "--build-tokens",
                 "1500", "--val-tokens", "200", "--tokens-per-shard", "400"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "target answers:" in out
    m = load_manifest(shards / "train")
    assert m.total_tokens >= 1500 and m.header["answers"] == "target"
    assert m.header["answer_max_new_tokens"] == 12
    assert load_manifest(shards / "val").header["target_argmax"] is True

    # the builder's order of the split, each conversation's first user turn as the prompt
    cfg = HiddenStatesConfig(corpus=str(chats), max_seq_len=64)
    convs = open_corpus(cfg, tok, "train").conversations
    reader = ShardReader(shards / "train")
    for s in range(len(reader)):
        row = reader[s]
        prompt = prompt_ids(tok, convs[s].user_turns()[0])
        assert row["input_ids"][:len(prompt)].tolist() == prompt
        assert row["loss_mask"].tolist() == [0] * len(prompt) + [1] * (
            len(row["input_ids"]) - len(prompt))
        assert 1 <= len(row["input_ids"]) - len(prompt) <= 12

    draft = tmp_path / "draft"
    assert main(["train", *common, "--train-tokens", "1200", "--val-tokens", "200",
                 "--train-batch-size", "8", "--checkpoint-every", "50", "--val-chain-len", "2",
                 "--out", str(draft)]) == 0
    result = json.loads((draft / "result.json").read_text())
    assert 1.0 <= result["val/tau_chain"] and Path(draft / "draft").is_dir()
    with pytest.raises(ConfigError, match="online training reads the corpus"):
        online_sources(HiddenStatesConfig(answers="target"), None, TrainConfig())
