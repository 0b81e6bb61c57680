"""``scylla bench``: side-by-side measurement, exactness check, and the errors users get."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from decoding_fixtures import random_draft
from transformers import LlamaConfig, LlamaForCausalLM

from scylla.commands.bench import format_sweep, format_table, log_to_mlflow, prompt_cis
from scylla.commands.cli import main
from scylla.config import DecodeConfig, TargetSpec, as_params
from scylla.data.prompts import Prompt
from scylla.decoding.bench import (
    Bench,
    batch_sweep,
    compare,
    encode_prompts,
    mean_ci,
    measure,
)
from scylla.decoding.forward_cost import format_forward_cost, forward_cost
from scylla.decoding.result import DecodeResult, RowStats
from scylla.errors import DataError
from scylla.modeling import LlamaFamilyModel

USER_DATA_DIR = os.environ.get("SCYLLA_DATA_DIR")  # read before fixtures isolate it


@pytest.fixture(scope="module")
def tiny_bench():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model = LlamaFamilyModel.from_hf(hf).eval()
    target = SimpleNamespace(name="tiny", model=model, eos_token_ids=[2],
                             tokenizer=SimpleNamespace(pad_token_id=0), device=model.device,
                             dtype=model.dtype)
    return Bench(target, hf_loader=lambda: hf)


def clocked(bench, seconds, alter=None):
    """A Bench on ``bench``'s models whose ``timed`` reports ``seconds[method]`` as the call's
    wall time, and passes each result through ``alter(method, result)`` if given."""
    fixed = Bench(bench.target, bench.draft, bench.hf)

    def timed(method, ids, cfg):
        result = Bench.timed(fixed, method, ids, cfg)
        result.seconds["total"] = seconds[method]
        return alter(method, result) if alter else result

    fixed.timed = timed
    return fixed


def test_hf_and_plain_agree_and_speedup_is_the_ratio_of_their_tokens_per_s(tiny_bench):
    g = torch.Generator().manual_seed(1)
    ids = [[1] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    bench = clocked(tiny_bench, {"hf": 0.5, "plain": 2.0})
    for batch in (1, 3):
        cfg = DecodeConfig(max_new_tokens=12, decode_batch_size=batch)
        lines = []
        reports = measure(bench, cfg, ["hf", "plain"], ids, ["a", "b", "a", "b"],
                          log=lines.append)
        assert [line.split(":")[0] for line in lines] == ["[1/2] hf", "[2/2] plain"]
        by = {r.method: r for r in reports}
        assert by["hf"].exact_match and by["plain"].exact_match
        assert by["hf"].tokens_sha256 == by["plain"].tokens_sha256
        new = by["plain"].new_tokens
        assert by["hf"].new_tokens == new > 0
        assert by["plain"].tokens_per_s == pytest.approx(new / 2.0)
        assert by["hf"].tokens_per_s == pytest.approx(new / 0.5)
        assert by["hf"].speedup == pytest.approx(4.0)  # (new / 0.5) / (new / 2.0)
        assert by["hf"].metrics["decode/speedup"] == pytest.approx(4.0)
        assert set(by["plain"].per_category) == {"a", "b"}


def test_a_method_whose_tokens_differ_from_plain_is_reported_where_they_differ(tiny_bench):
    """Negative control: one token of one prompt altered on purpose after decoding."""
    ids = [[1, 5, 6, 7], [1, 20, 21, 22, 23], [1, 40]]
    spot = {}

    def alter(method, result):
        if method == "hf":
            row = result.tokens[1]
            spot.update(position=len(row) // 2, reference_token=row[len(row) // 2])
            row[spot["position"]] = (row[spot["position"]] + 1) % 128
        return result

    bench = clocked(tiny_bench, {"hf": 1.0, "plain": 1.0}, alter)
    cfg = DecodeConfig(max_new_tokens=8)
    by = {r.method: r for r in measure(bench, cfg, ["plain", "hf"], ids, ["a", "b", "a"])}
    assert by["plain"].exact_match and by["plain"].mismatches == []
    assert by["hf"].exact_match is False
    assert by["hf"].metrics["decode/exact_match"] == 0.0
    (row,) = by["hf"].mismatches
    assert row["prompt"] == 1 and row["position"] == spot["position"] > 0
    assert row["reference_token"] == spot["reference_token"]
    assert row["method_token"] == (spot["reference_token"] + 1) % 128
    # the gap is the target's at the reference's context: plain greedy took its top-1 token
    assert row["target_top2"][0] == spot["reference_token"] and row["logit_gap"] >= 0
    assert by["hf"].tokens_sha256 != by["plain"].tokens_sha256


def test_repeats_interleave_the_methods_and_pair_each_round_with_its_own_plain(tiny_bench):
    """The machine slows down 3x in round 2: a speed-up against another round's plain would
    move, the paired one does not; rounds run each method once, in the order given."""
    ids = [[1, 5, 6, 7], [1, 20, 21]]
    clock = {"plain": iter([1.0, 3.0, 2.0]), "hf": iter([0.5, 1.5, 1.0])}
    order = []
    bench = Bench(tiny_bench.target, tiny_bench.draft, tiny_bench.hf)

    def timed(method, ids, cfg):
        order.append(method)
        result = Bench.timed(bench, method, ids, cfg)
        result.seconds["total"] = next(clock[method])
        return result

    bench.timed = timed
    cfg = DecodeConfig(max_new_tokens=6)
    lines = []
    reports = measure(bench, cfg, ["plain", "hf"], ids, ["a", "b"], log=lines.append,
                      repeats=3)
    assert order == ["plain", "hf"] * 3
    assert lines[2].startswith("[2/3] [1/2] plain")
    assert [(r.method, r.repeat) for r in reports] == [
        ("plain", 1), ("hf", 1), ("plain", 2), ("hf", 2), ("plain", 3), ("hf", 3)]
    hf = [r for r in reports if r.method == "hf"]
    assert [r.speedup for r in hf] == pytest.approx([2.0, 2.0, 2.0])
    assert all(r.exact_match for r in reports)
    text = format_table({"machine": "m", "target": "tiny", "dtype": "float32", "device": "cpu",
                         "num_prompts": 2, "config": asdict(cfg), "repeats": 3,
                         "methods": [asdict(r) for r in reports]})
    assert "3 interleaved rounds" in text and "speed-up 2.00 [2.00, 2.00]x" in text
    methods_table = text.split("tau per category")[0]
    assert methods_table.count("\nhf ") == 1  # one row per method, not per round


def test_each_round_is_logged_as_its_own_run_named_by_its_repeat(tiny_bench):
    import mlflow

    cfg = DecodeConfig(max_new_tokens=4)
    reports = measure(tiny_bench, cfg, ["plain"], [[1, 4, 5], [1, 6]], ["a", "a"], repeats=2)
    report = {"machine": "m", "config": as_params(cfg), "num_prompts": 2, "draft": None,
              "prompts": "p.jsonl", "prompts_sha256": "0" * 64, "repeats": 2,
              "methods": [asdict(r) for r in reports]}
    log_to_mlflow(report, TargetSpec())
    runs = mlflow.search_runs(search_all_experiments=True)
    assert sorted(runs["params.repeat"]) == ["1", "2"]
    assert set(runs["params.repeats"]) == {"2"} and set(runs["params.method"]) == {"plain"}


def test_mean_ci_is_the_student_t_interval():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-6)
    assert math.isnan(mean_ci([5.0])[1])


def test_mismatch_is_reported_with_its_logit_gap(tiny_bench):
    ids = [[1, 5, 6, 7]]
    ref = DecodeResult(tokens=[[10, 11, 12]], stats=[RowStats(new_tokens=3, target_forwards=3)])
    got = DecodeResult(tokens=[[10, 99, 12]], stats=[RowStats(new_tokens=3, target_forwards=3)])
    (row,) = compare(got, ref, ids, tiny_bench.hf)
    assert row["position"] == 1 and row["method_token"] == 99 and row["reference_token"] == 11
    assert row["logit_gap"] >= 0
    loaded = []
    assert compare(ref, ref, ids, lambda: loaded.append(1)) == [] and not loaded


def test_table_shows_methods_and_categories(tiny_bench):
    cfg = DecodeConfig(max_new_tokens=4)
    reports = measure(tiny_bench, cfg, ["plain"], [[1, 4, 5], [1, 6]], ["qa", "rag"])
    text = format_table({"machine": "m", "target": "tiny", "dtype": "float32", "device": "cpu",
                         "num_prompts": 2, "config": asdict(cfg),
                         "methods": [asdict(r) for r in reports]})
    assert "plain" in text and "qa" in text and "rag" in text and "yes" in text


def test_batch_sweep_times_plain_once_per_batch_size_and_every_tree_is_exact(tiny_bench):
    bench = Bench(tiny_bench.target, random_draft(tiny_bench.target), tiny_bench.hf)
    runs = []
    timed = bench.timed
    bench.timed = lambda m, ids, cfg: runs.append((m, cfg.decode_batch_size)) or timed(m, ids, cfg)
    ids = [[1, 7, 8, 9], [1, 20, 21], [1, 30]]
    cfg = DecodeConfig(max_new_tokens=6, tree_depth=2, tree_total_tokens=3)
    seen = []
    rows = batch_sweep(bench, cfg, ids * 12, ["a", "b", "a"] * 12, [1, 2], [1, 2, "auto"],
                       log=seen.append)
    assert seen == rows
    assert runs == [("plain", 1), ("tree", 1), ("tree", 1), ("hybrid", 1), ("plain", 2),
                    ("tree", 2), ("tree", 2), ("hybrid", 2)]
    assert [(r["decode_batch_size"], r["tree_top_k"]) for r in rows] == [
        (1, 1), (1, 2), (1, "auto"), (2, 1), (2, 2), (2, "auto")]
    assert [bool(r["plan"]) for r in rows] == [False, False, True] * 2
    assert all(r["exact_match"] and r["tau"] >= 1 for r in rows)
    for r in rows:
        assert r["speedup"] == pytest.approx(r["tree_tokens_per_s"] / r["plain_tokens_per_s"])
    text = format_sweep({"machine": "m", "target": "tiny", "draft": "d", "num_prompts": 3,
                         "config": asdict(cfg), "sweep": rows})
    assert "best k" in text and "planner" in text and len(text.splitlines()) == 4 + 2 + 3


def test_drafted_methods_report_the_share_of_plain_tokens_their_vocabulary_holds(tiny_bench):
    ids = [[1, 7, 8, 9], [1, 20, 21]]
    cfg = DecodeConfig(max_new_tokens=6, tree_depth=2, tree_total_tokens=3, tree="fixed")
    plain = tiny_bench.run_method("plain", ids, cfg).tokens
    out = sorted({t for row in plain for t in row})
    held = [t for t in range(128) if t not in out[:2]]  # the first two output tokens left out
    d2t = torch.tensor(held[:64])
    bench = Bench(tiny_bench.target, random_draft(tiny_bench.target, d2t=d2t), tiny_bench.hf)
    reports = {r.method: r for r in measure(bench, cfg, ["plain", "pld", "tree"], ids,
                                            ["a", "b"])}
    inside = set(d2t.tolist())
    flat = [t for row in plain for t in row]
    want = sum(t in inside for t in flat) / len(flat)
    assert want < 1
    assert reports["tree"].metrics["decode/draft_vocab_coverage"] == pytest.approx(want)
    assert "decode/draft_vocab_coverage" not in reports["pld"].metrics  # no draft
    assert "decode/draft_vocab_coverage" not in reports["plain"].metrics
    text = format_table({"machine": "m", "target": "tiny", "dtype": "float32", "device": "cpu",
                         "num_prompts": 2, "config": asdict(cfg),
                         "methods": [asdict(r) for r in reports.values()]})
    assert f"coverage of plain decoding's tokens: {want:.1%}" in text


def test_forward_cost_times_each_k_and_leaves_the_caches_as_they_were(tiny_bench):
    model = tiny_bench.target.model
    draft = random_draft(tiny_bench.target)
    lengths = []
    new_cache = model.new_cache
    model.new_cache = lambda b, n: lengths.append(new_cache(b, n)) or lengths[-1]
    try:
        rows = forward_cost(model, [1, 4], context=16, draft=draft, repeats=2)
    finally:
        del model.new_cache
    assert [r["k"] for r in rows] == [1, 4]
    assert all(r["target_ms"] > 0 and r["draft_ms"] > 0 for r in rows)
    assert lengths[0].lengths.tolist() == [16]  # every timed forward was cut off again
    text = format_forward_cost(rows, 16)
    assert "16-token cache" in text and len(text.splitlines()) == 4


@pytest.mark.real
def test_prompt_longer_than_the_context_is_refused():
    from scylla.modeling.targets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    long = Prompt(id="long", category="x", turns=["word " * 9000])
    with pytest.raises(DataError, match="prompt 'long' has .* context window of 8192"):
        encode_prompts(tok, [long], 8192, 64)


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ('{"prompt": "hi"}\n{"prompt": \n', ":2"),
])
def test_bad_prompt_files_fail_with_the_file_named(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    assert main(["bench", "--prompts", str(path), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err


def test_unknown_method_and_target_are_named(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["bench", "--prompts", str(path), "--methods", "plain,warp", "--no-mlflow"]) == 2
    assert "unknown method 'warp'" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(path), "--num-prompts", "1", "--target",
                 "no-such-model", "--no-mlflow"]) == 2
    assert "unknown target 'no-such-model'" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(path), "--repeats", "0", "--no-mlflow"]) == 2
    assert "--repeats=0: must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(path), "--repeats", "3", "--sweep-batch", "1,2",
                 "--no-mlflow"]) == 2
    assert "--repeats applies to a --methods run" in capsys.readouterr().err


@pytest.mark.real
def test_main_job_baseline_loads_the_models_once_and_logs_both_batch_sizes(
        capsys, monkeypatch, mlflow_store):
    import scylla.commands.main as main_module
    from scylla.analysis.runs import load_runs

    # the real target's converted copy lives in the user's data dir, not the test's
    if USER_DATA_DIR is None:
        monkeypatch.delenv("SCYLLA_DATA_DIR")
    else:
        monkeypatch.setenv("SCYLLA_DATA_DIR", USER_DATA_DIR)
    loads = []
    real_load = main_module.load_bench
    monkeypatch.setattr(main_module, "load_bench", lambda *a: loads.append(a) or real_load(*a))
    assert main(["main", "--skip-sweeps", "--num-prompts", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert len(loads) == 1
    assert out.count("decode_batch_size: 1,") == 1 and out.count("decode_batch_size: 8,") == 1
    runs = load_runs(stage="decode")
    methods = ["hf", "plain", "hybrid"]  # hybrid with the shipped draft
    assert sorted(runs["decode_batch_size"].astype(int).tolist()) == [1] * 3 + [8] * 3
    assert sorted(runs["method"]) == sorted(methods * 2)


def test_the_table_shows_prompt_bootstrap_cis_that_have_a_width():
    metrics = {"decode/tau": 1.6, "decode/tau_ci_low": 1.52, "decode/tau_ci_high": 1.71,
               "decode/alpha_at_0": 0.4, "decode/alpha_at_0_ci_low": 0.35,
               "decode/alpha_at_0_ci_high": 0.45, "decode/alpha": 0.3,
               "decode/alpha_ci_low": 0.3, "decode/alpha_ci_high": 0.3}
    assert prompt_cis(metrics) == "tau 1.60 [1.52, 1.71], first-token acceptance 0.40 [0.35, 0.45]"
    assert prompt_cis({"decode/tau": 1.0}) == ""
