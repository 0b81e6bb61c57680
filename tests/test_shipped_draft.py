"""The draft shipped in the repository for the default target (``--draft default``)."""
from __future__ import annotations

import json
import shutil

import pytest
from decoding_fixtures import tiny_target

from scylla.commands.cli import main
from scylla.drafts.checkpoint import CONFIG, WEIGHTS, load_draft
from scylla.drafts.io import SHIPPED, from_pretrained
from scylla.errors import ConfigError, DataError, DraftMismatchError

TARGET = "smollm2-135m-instruct"
LIMIT = 20 * 2**20  # the repository keeps drafts of at most 20 MB


def test_the_default_target_has_a_small_shipped_draft_with_its_card():
    path = SHIPPED / TARGET
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= LIMIT, f"{path}: {size / 2**20:.1f} MB"
    spec = json.loads((path / CONFIG).read_text())
    assert spec["target"]["name"] == TARGET and spec["extra"]["cumulative_tokens"] > 0
    card = (path / "README.md").read_text()
    assert "val/tau_chain" in card and "cumulative_tokens" in card


def test_a_target_without_a_shipped_draft_is_named():
    with pytest.raises(ConfigError, match="no draft is shipped for target 'tiny'"):
        from_pretrained("default", tiny_target(32))


def test_a_wrong_target_gives_the_usual_error(tmp_path):
    with pytest.raises(DraftMismatchError, match="does not belong to target 'tiny'"):
        load_draft(SHIPPED / TARGET, tiny_target(32))


@pytest.mark.real
def test_bench_uses_the_shipped_draft_without_training(capsys, tmp_path, monkeypatch):
    from scylla.modeling.targets import load_target

    target = load_target(TARGET)
    draft = from_pretrained("default", target)
    assert draft.dtype == target.model.embed_tokens.weight.dtype  # cast back from bfloat16
    corrupt = tmp_path / "corrupt"
    shutil.copytree(SHIPPED / TARGET, corrupt)
    (corrupt / WEIGHTS).write_bytes((corrupt / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot read draft weights"):
        load_draft(corrupt, target)
    assert main(["bench", "--methods", "plain,tree", "--num-prompts", "2", "--max-new-tokens",
                 "8", "--tree", "fixed", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "using the draft shipped" in out
    tree = [line for line in out.splitlines() if line.startswith("tree ")][-1]
    assert tree.split()[-1] == "yes"  # exact against plain
