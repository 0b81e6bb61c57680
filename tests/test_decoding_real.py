"""The engine on the real SmolLM2-135M-Instruct target, and ``scylla generate``.

The draft is an untrained one (rejections everywhere) unless SCYLLA_TEST_DRAFT names a trained
checkpoint; prompt lookup accepts real copies of the prompt.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from scylla.commands.cli import main
from scylla.config import DecodeConfig
from scylla.decoding import METHODS

pytestmark = pytest.mark.real
MAX_NEW = 10
QUESTIONS = ["Repeat after me: the quick brown fox jumps over the lazy dog.",
             "List the numbers from one to ten, separated by commas."]


@pytest.fixture(scope="module")
def real():
    from scylla.drafts import draft_spec, instantiate, load_draft
    from scylla.modeling.targets import load_target

    target = load_target("smollm2-135m-instruct")
    if os.environ.get("SCYLLA_TEST_DRAFT"):
        draft = load_draft(os.environ["SCYLLA_TEST_DRAFT"], target)
    else:
        torch.manual_seed(0)
        draft = instantiate(draft_spec("scylla", 1, target), target).eval()
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                    add_generation_prompt=True)
               for q in QUESTIONS]
    prompts = [list(p if isinstance(p, list) else p["input_ids"]) for p in prompts]
    plain = METHODS["plain"](target, prompts, DecodeConfig(max_new_tokens=MAX_NEW), None)
    return target, draft, prompts, plain


@pytest.mark.parametrize("method,batch", [("tree", 1), ("tree", 2), ("chain", 2),
                                          ("static-tree", 2), ("pld", 2)])
def test_real_target_greedy_equals_plain(real, method, batch):
    target, draft, prompts, plain = real
    cfg = DecodeConfig(max_new_tokens=MAX_NEW, decode_batch_size=batch, draft_len=3,
                       tree_top_k=3, tree_depth=3, tree_total_tokens=6, static_tree="0,1,00")
    res = METHODS[method](target, prompts, cfg, draft)
    assert res.tokens == plain.tokens
    if method == "pld":
        assert res.tau > 1.0  # the copy task is found in the prompt


def test_generate_streams_text_and_reports_tau(real, tmp_path, capsys):
    from scylla.drafts import save_draft

    _, draft, _, _ = real
    path = save_draft(draft, tmp_path / "draft")
    assert main(["generate", "--draft", str(path), "--prompt", QUESTIONS[0],
                 "--max-new-tokens", "8", "--tree-top-k", "2", "--tree-depth", "2",
                 "--tree-total-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "[tree] τ=" in out.err and "tokens/s" in out.err
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": QUESTIONS[1]}]))
    assert main(["generate", "--chat", str(chat), "--max-new-tokens", "8"]) == 0
    assert "[pld] τ=" in capsys.readouterr().err


def test_generate_errors(real, tmp_path, capsys):
    bad = tmp_path / "chat.json"
    bad.write_text('[{"role": "robot", "content": "hi"}]')
    assert main(["generate", "--chat", str(bad), "--max-new-tokens", "4"]) == 2
    assert "--chat" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--method", "tree", "--max-new-tokens", "4"]) == 2
    assert "needs a draft model" in capsys.readouterr().err
