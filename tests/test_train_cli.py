"""`scylla hidden-states` and `scylla train` end to end on a tiny target with SmolLM2's tokenizer:
MLflow runs, a build killed by SIGKILL, errors, and two-process DDP training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from drafts_fixtures import tiny_hf
from safetensors.torch import load_file

from scylla.commands.cli import main
from scylla.data.shards import load_manifest
from scylla.drafts.validate import metric_prefix
from scylla.drafts.vocab import file_digest
from scylla.modeling.targets import load_tokenizer
from scylla.pipeline.owner import OWNER_TAG, owner_id

pytestmark = pytest.mark.real  # the SmolLM2 tokenizer (the target itself is tiny and random)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang in the old tree "
         "near our small house by the river").split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer, and a JSONL chat corpus."""
    root = tmp_path_factory.mktemp("cli")
    tok = load_tokenizer("smollm2-135m-instruct")
    hf = tiny_hf(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    hf.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    with open(root / "chats.jsonl", "w") as f:
        for i in range(120):
            n = 8 + i % 23
            reply = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
            f.write(json.dumps({"id": f"c{i}", "conversations": [
                {"from": "human", "value": f"Tell me story number {i}."},
                {"from": "gpt", "value": reply.capitalize() + "."}]}) + "\n")
    return root


def common(ws, shards):
    return ["--target", str(ws / "target"), "--corpus", str(ws / "chats.jsonl"),
            "--max-seq-len", "64", "--shards", str(shards)]


def hs_args(ws, shards, build_tokens=3000):
    return ["hidden-states", *common(ws, shards), "--build-tokens", str(build_tokens),
            "--val-tokens", "300", "--tokens-per-shard", "500"]


def train_args(ws, shards, out, *extra):
    return ["train", *common(ws, shards), "--train-tokens", "2500", "--val-tokens", "300",
            "--train-batch-size", "8", "--lr", "0.01", "--checkpoint-every", "5",
            "--val-chain-len", "3", "--out", str(out), "--no-progress", *extra]


def subprocess_env(ws):
    # one thread per process: the tiny model gains nothing from more (see drafts_fixtures)
    return {**os.environ, "SCYLLA_DATA_DIR": str(ws / "data"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def data_dir(workspace, monkeypatch):
    monkeypatch.setenv("SCYLLA_DATA_DIR", str(workspace / "data"))


def runs(stage):
    return mlflow.search_runs(search_all_experiments=True,
                              filter_string=f"tags.stage = '{stage}'", output_format="list")


def test_hidden_states_then_train_log_their_stages(workspace, tmp_path, capsys, mlflow_store):
    shards = tmp_path / "shards"
    assert main(hs_args(workspace, shards)) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "tokens/s" in out
    m = load_manifest(shards / "train")
    assert m.total_tokens >= 3000 and m.header["max_seq_len"] == 64
    assert load_manifest(shards / "val").header["target_argmax"] is True
    (hs,) = runs("hidden_states")
    assert hs.data.metrics["hidden_states/train_tokens_per_s"] > 0
    assert hs.data.params["build_tokens"] == "3000"

    assert main(train_args(workspace, shards, tmp_path / "draft")) == 0
    (tr,) = runs("train")
    p = tr.data.params
    assert p["train_tokens"] == "2500" and p["draft_n_layer"] == "1" and p["seed"] == "0"
    assert int(p["draft_params"]) > 0 and p["kind"] == "scylla"
    assert 1.0 <= tr.data.metrics["val/tau_chain"] <= 4.0
    assert tr.data.tags["draft"].endswith("draft")
    result = json.loads((tmp_path / "draft" / "result.json").read_text())
    assert result["draft_params"] == int(p["draft_params"])
    card = (tmp_path / "draft" / "draft" / "README.md").read_text()  # the checkpoint's card
    assert f"| `corpus` | {workspace / 'chats.jsonl'} |" in card
    capsys.readouterr()
    assert main(train_args(workspace, shards, tmp_path / "draft")) == 0  # reported, not rerun
    assert "already trained" in capsys.readouterr().out and len(runs("train")) == 1


def test_train_errors_name_the_problem(workspace, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(hs_args(workspace, shards, build_tokens=1000)) == 0
    assert main(train_args(workspace, shards, tmp_path / "d", "--no-mlflow")) == 2
    assert "fewer than train_tokens=2500" in capsys.readouterr().err
    assert main(train_args(workspace, shards, tmp_path / "d", "--no-mlflow", "--kind",
                           "eagle3", "--train-tokens", "900")) == 2
    assert "lacks target layers" in capsys.readouterr().err
    shard = shards / "train" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-20] + b"\0" * 20)
    assert main(train_args(workspace, shards, tmp_path / "d", "--no-mlflow",
                           "--train-tokens", "900")) == 2
    assert "shard-00000.safetensors is corrupt" in capsys.readouterr().err


def test_online_training_needs_no_shards(workspace, tmp_path):
    out = tmp_path / "online"
    assert main(train_args(workspace, tmp_path / "none", out, "--online", "--no-mlflow",
                           "--kind", "eagle3", "--train-tokens", "900")) == 0
    result = json.loads((out / "result.json").read_text())
    assert 1.0 <= result["val/tau_chain"] and not (tmp_path / "none").exists()
    assert "train/loss_step2" in result  # eagle3's unrolled steps, fed by the target online


def test_a_build_killed_with_sigkill_resumes_to_the_same_shards(workspace, tmp_path):
    cmd = [sys.executable, "-m", "scylla.commands.cli",
           *hs_args(workspace, tmp_path / "killed", 6000),
           "--build-batch-tokens", "64", "--no-mlflow"]
    proc = subprocess.Popen(cmd, env=subprocess_env(workspace), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "train" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_manifest(tmp_path / "killed" / "train")
    assert 1 <= len(done.shards) and done.total_tokens < 6000  # killed mid-build
    assert main(hs_args(workspace, tmp_path / "killed", 6000) + ["--no-mlflow"]) == 0
    assert main(hs_args(workspace, tmp_path / "whole", 6000) + ["--no-mlflow"]) == 0
    a, b = load_manifest(tmp_path / "killed" / "train"), load_manifest(tmp_path / "whole" / "train")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


# ~33 s here (60-75 s while five other jobs loaded the 2 cores): two extra Python processes
def test_ddp_two_processes_follow_the_single_process_loss_curve(workspace, tmp_path,
                                                              mlflow_store):
    shards = tmp_path / "shards"
    assert main(hs_args(workspace, shards)) == 0
    extra = ["--accelerator", "cpu", "--feature-noise", "0"]
    assert main(train_args(workspace, shards, tmp_path / "single", *extra)) == 0
    cmd = [sys.executable, "-m", "scylla.commands.cli",
           *train_args(workspace, shards, tmp_path / "ddp", *extra, "--devices", "2",
                       "--strategy", "ddp")]
    res = subprocess.run(cmd, env=subprocess_env(workspace), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    by_out = {Path(r.data.tags["draft"]).parent.name: r for r in runs("train")}
    assert set(by_out) == {"single", "ddp"}  # one run for the two ranks
    client = mlflow.MlflowClient()
    curves = {k: [m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
              for k, r in by_out.items()}
    single, ddp = torch.tensor(curves["single"]), torch.tensor(curves["ddp"])
    assert len(single) == len(ddp) >= 5
    assert single[-1] < single[0] and ddp[-1] < ddp[0]
    # each rank averages its half of a batch: close to, not equal to, the full-batch mean
    assert ((ddp - single).abs() / single).max() < 0.1


@pytest.mark.slow  # 17-110 s here: a subprocess killed mid-training, then two trainings
def test_training_killed_with_sigkill_resumes_in_the_same_run(workspace, tmp_path,
                                                              mlflow_store):
    shards = tmp_path / "shards"
    assert main(hs_args(workspace, shards) + ["--no-mlflow"]) == 0
    args = train_args(workspace, shards, tmp_path / "killed", "--checkpoint-every", "2")
    proc = subprocess.Popen([sys.executable, "-m", "scylla.commands.cli", *args],
                            env=subprocess_env(workspace), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.05)
    time.sleep(0.5)  # let the first checkpoint land whole (it is renamed into place)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file() and not (tmp_path / "killed" / "result.json").exists()
    assert main(args) == 0
    (resumed,) = runs("train")
    assert resumed.data.tags[OWNER_TAG] == owner_id()  # not the killed process any more
    assert main(train_args(workspace, shards, tmp_path / "whole", "--checkpoint-every", "2")) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "killed" / "draft" / "draft.safetensors"))
    b = load_file(str(tmp_path / "whole" / "draft" / "draft.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(runs("train")) == 2  # the killed attempt and its resumption share one run


def test_budgets_share_one_vocabulary_and_a_draft_continues(workspace, tmp_path):
    """--draft-vocab-size counts one vocabulary file (the whole training split), the same for
    every budget; --init-from continues a draft on the tokens after those it has seen."""
    def train(out, *extra):
        return main(train_args(workspace, tmp_path / "none", out, "--online", "--no-mlflow",
                               "--draft-vocab-size", "64", *extra))

    assert train(tmp_path / "a", "--train-tokens", "900") == 0
    assert train(tmp_path / "b", "--train-tokens", "1500") == 0
    a, b = (load_file(str(tmp_path / d / "draft" / "draft.safetensors")) for d in "ab")
    assert torch.equal(a["d2t"], b["d2t"])
    (vocab_file,) = (workspace / "data" / "vocab").rglob("*.safetensors")
    spec = json.loads((tmp_path / "a" / "draft" / "draft.json").read_text())
    assert spec["extra"]["vocab"]["digest"] == file_digest(vocab_file)
    (_, seen, data), = spec["extra"]["slices"]
    assert data == str(workspace / "chats.jsonl")  # the corpus, its own replies
    assert train(tmp_path / "c", "--train-tokens", "600", "--init-from",
                 str(tmp_path / "a")) == 0
    extra = json.loads((tmp_path / "c" / "draft" / "draft.json").read_text())["extra"]
    assert extra["slices"][0] == [0, seen, data] and extra["slices"][1][:1] == [seen]
    assert extra["cumulative_tokens"] == extra["slices"][1][1] >= seen + 600
    c = load_file(str(tmp_path / "c" / "draft" / "draft.safetensors"))
    assert torch.equal(a["d2t"], c["d2t"]) and extra["vocab"] == spec["extra"]["vocab"]


def test_validate_reproduces_a_runs_own_validation_and_logs_into_it(workspace, tmp_path,
                                                                     capsys, mlflow_store):
    """`scylla validate` on the text a draft was validated on gives its own val/* (the same
    module, config and shards), logs them into its train run once, and names a missing draft."""
    shards = tmp_path / "shards"
    assert main(hs_args(workspace, shards)) == 0
    assert main(train_args(workspace, shards, tmp_path / "d")) == 0
    (tr,) = runs("train")
    exp = mlflow.get_experiment(tr.info.experiment_id).name
    validate = ["validate", "--target", str(workspace / "target"), "--corpus",
                str(workspace / "chats.jsonl"), "--shards", str(shards), "--val-tokens", "300",
                "--no-progress"]
    assert main([*validate, "--experiment", exp]) == 0
    prefix = metric_prefix(str(workspace / "chats.jsonl"))
    (tr,) = runs("train")
    m = tr.data.metrics
    for name in ("tau_chain", "top1_acc", "loss", "alpha_at_1", "tau_chain_replayed"):
        assert m[prefix + name] == pytest.approx(m[f"val/{name}"], rel=1e-6), name
    assert tr.data.tags["scylla." + prefix.rstrip("/")] == str(shards / "val")
    capsys.readouterr()
    assert main([*validate, "--experiment", exp]) == 0  # done already: skipped
    assert "validated on" in capsys.readouterr().out
    assert main([*validate, "--draft", str(tmp_path / "gone")]) == 2
    assert "is not on this machine" in capsys.readouterr().err
