"""A stage's code identity covers what it imports and nothing else
(scylla.pipeline.code_identity)."""
import shutil

import pytest

from scylla.pipeline import code_identity
from scylla.pipeline.code_identity import PACKAGE_ROOT, code_version, module_files
from scylla.pipeline.stages import StageCall

TRAIN = "scylla.commands.train"  # the train stage's command module


@pytest.fixture
def package(tmp_path):
    """A copy of the scylla source to edit (code_version caches per root)."""
    root = tmp_path / "scylla"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def edit(path, text="\n# edited\n"):
    path.write_text(path.read_text() + text)
    code_version.cache_clear()


def relative(files, root):
    return {f.relative_to(root).as_posix() for f in files}


def test_train_code_is_its_import_closure():
    files = relative(module_files(TRAIN), PACKAGE_ROOT)
    # the model, objective, data and the packages on the way are in; analysis is not
    assert {"__init__.py", "drafts/__init__.py", "drafts/train.py", "drafts/module.py",
            "commands/train.py", "modeling/model.py", "data/shards.py", "config.py"} <= files
    assert not any(f.startswith("analysis/") for f in files)
    assert "decoding/engine.py" not in files


def test_editing_an_imported_module_changes_the_version_and_others_do_not(package):
    before = code_version(TRAIN, package)
    edit(package / "analysis" / "plots.py")
    edit(package / "decoding" / "tree.py")
    assert code_version(TRAIN, package) == before
    bench = "scylla.commands.bench"
    assert code_version(bench, package) != code_version(bench, PACKAGE_ROOT)
    edit(package / "drafts" / "objective.py")  # imported by the training module, transitively
    assert code_version(TRAIN, package) != before


def test_an_import_inside_a_function_counts(package):
    (package / "extra.py").write_text("X = 1\n")
    before = code_version(TRAIN, package)
    edit(package / "drafts" / "train.py", "\n\ndef _late():\n    from scylla.extra import X\n")
    after = code_version(TRAIN, package)
    edit(package / "extra.py")
    assert before != after != code_version(TRAIN, package)


def test_unknown_module_is_an_error():
    with pytest.raises(ValueError, match="no source for module 'scylla.nope'"):
        module_files("scylla.nope")


def test_each_stage_call_is_keyed_by_its_own_code():
    train, decode = StageCall("train", {}, "e"), StageCall("decode", {}, "e")
    fit = StageCall("fit", {}, "e")
    simulated = StageCall("train", {}, "e", simulated=True)
    versions = {c.stage + str(c.simulated): code_identity.code_version(m) for c, m in [
        (train, TRAIN), (decode, "scylla.commands.bench"), (fit, "scylla.commands.fit"),
        (simulated, "scylla.pipeline.simulate")]}
    assert len(set(versions.values())) == 4
    from scylla.pipeline.stages import code_version as call_version
    assert [call_version(c) for c in (train, decode, fit, simulated)] == list(versions.values())
