"""The engine on the real SmolLM2-135M-Instruct target, and ``scylla generate``.

The draft is the one shipped for the target (``--draft default``) unless SCYLLA_TEST_DRAFT names
another checkpoint; prompt lookup accepts real copies of the prompt.
"""
from __future__ import annotations

import json
import os

import pytest

from scylla.commands.cli import main
from scylla.config import DecodeConfig
from scylla.decoding import METHODS

pytestmark = pytest.mark.real
MAX_NEW = 10
QUESTIONS = ["Repeat after me: the quick brown fox jumps over the lazy dog.",
             "List the numbers from one to ten, separated by commas."]


@pytest.fixture(scope="module")
def real():
    from scylla.drafts.io import from_pretrained
    from scylla.modeling.targets import load_target

    target = load_target("smollm2-135m-instruct")
    draft = from_pretrained(os.environ.get("SCYLLA_TEST_DRAFT", "default"), target)
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                    add_generation_prompt=True)
               for q in QUESTIONS]
    prompts = [list(p if isinstance(p, list) else p["input_ids"]) for p in prompts]
    plain = METHODS["plain"](target, prompts, DecodeConfig(max_new_tokens=MAX_NEW), None)
    return target, draft, prompts, plain


@pytest.mark.parametrize("method,batch,tree", [
    ("tree", 1, "fixed"), ("tree", 2, "fixed"), ("chain", 2, "fixed"),
    ("static-tree", 2, "fixed"), ("pld", 2, "fixed"), ("hybrid", 2, "fixed"),
    ("hybrid", 1, "auto")])
def test_real_target_greedy_equals_plain(real, method, batch, tree):
    target, draft, prompts, plain = real
    cfg = DecodeConfig(max_new_tokens=MAX_NEW, decode_batch_size=batch, draft_len=3, tree=tree,
                       tree_top_k=3, tree_depth=3, tree_total_tokens=6, static_tree="0,1,00")
    res = METHODS[method](target, prompts, cfg, draft)
    assert res.tokens == plain.tokens
    if method in ("pld", "hybrid"):
        assert res.tau > 1.0  # the copy task is found in the prompt


def test_generate_streams_text_and_reports_tau(real, tmp_path, capsys):
    from scylla.drafts import save_draft

    _, draft, _, _ = real
    path = save_draft(draft, tmp_path / "draft")
    assert main(["generate", "--draft", str(path), "--prompt", QUESTIONS[0],
                 "--max-new-tokens", "8", "--tree-top-k", "2", "--tree-depth", "2",
                 "--tree-total-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "[hybrid] τ=" in out.err and "tokens/s" in out.err
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": QUESTIONS[1]}]))
    # no --draft: the shipped draft, with the hybrid method
    assert main(["generate", "--chat", str(chat), "--max-new-tokens", "8", "--tree",
                 "fixed"]) == 0
    assert "[hybrid] τ=" in capsys.readouterr().err
    assert main(["generate", "--chat", str(chat), "--max-new-tokens", "8", "--method",
                 "pld"]) == 0
    assert "[pld] τ=" in capsys.readouterr().err


def test_generate_errors(real, tmp_path, capsys):
    bad = tmp_path / "chat.json"
    bad.write_text('[{"role": "robot", "content": "hi"}]')
    assert main(["generate", "--chat", str(bad), "--max-new-tokens", "4"]) == 2
    assert "--chat" in capsys.readouterr().err
    missing = tmp_path / "no-draft"
    assert main(["generate", "--prompt", "hi", "--draft", str(missing), "--max-new-tokens",
                 "4"]) == 2
    assert str(missing) in capsys.readouterr().err


# issue 22's lossless check on the real target: every speculative method with fixed trees (so
# every step verifies a tree), the shipped draft, Spec-Bench prompts spread over the
# categories. About 2 CPU-hours for all four batch sizes on 2 cores; SCYLLA_LOSSLESS_PROMPTS
# shrinks it for a smoke run.
LOSSLESS_PROMPTS = int(os.environ.get("SCYLLA_LOSSLESS_PROMPTS", "100"))
LOSSLESS_METHODS = "plain,chain,tree,static-tree,pld,hybrid"


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_spec_bench_decodes_equal_plain_greedy_at_every_batch_size(batch, tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["bench", "--methods", LOSSLESS_METHODS, "--prompts", "spec-bench",
                 "--num-prompts", str(LOSSLESS_PROMPTS), "--max-new-tokens", "64",
                 "--decode-batch-size", str(batch), "--draft", "default", "--tree", "fixed",
                 "--no-mlflow", "--json", str(report_path)]) == 0
    methods = {m["method"]: m for m in json.loads(report_path.read_text())["methods"]}
    assert set(methods) == set(LOSSLESS_METHODS.split(","))
    assert methods["plain"]["new_tokens"] >= 32 * LOSSLESS_PROMPTS  # the decodes are not empty
    for name, m in methods.items():
        assert m["exact_match"] is True, (name, m["mismatches"])
        assert m["new_tokens"] == methods["plain"]["new_tokens"]
    assert methods["hybrid"]["tau"] > 1.0 and methods["tree"]["tau"] > 1.0
