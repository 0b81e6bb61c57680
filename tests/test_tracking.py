"""The tracking store: stage runs land in SQLite, and the MLflow UI serves that store."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

from scylla import paths, store
from scylla.pipeline import tracking
from scylla.pipeline.owner import OWNER_TAG, owner_id
from scylla.pipeline.tracking import stage_run


def test_a_stage_run_by_hand_logs_its_params_and_tags_its_owner(mlflow_store):
    """No driver: the default experiment, None params as "", the stage and owner tags."""
    assert tracking.run_context() == {}
    with stage_run("decode", {"decode_batch_size": 4, "draft": None},
                   tags={"machine": "m"}) as run:
        pass
    got = mlflow.get_run(run.info.run_id)
    assert mlflow.get_experiment(got.info.experiment_id).name == store.DEFAULT_EXPERIMENT
    assert got.data.params == {"decode_batch_size": "4", "draft": ""}
    assert {k: v for k, v in got.data.tags.items() if not k.startswith("mlflow.")} == {
        "stage": "decode", "machine": "m", OWNER_TAG: owner_id()}
    assert got.info.status == "FINISHED"
    assert paths.tracking_uri().startswith("sqlite:///")


def test_a_driver_context_names_the_experiment_labels_lineage_and_owner(mlflow_store):
    """Under a driver the run joins its attempt: the context's experiment and tags (its owner
    instead of this process), its labels and the upstream run's params as params (a name the
    stage logs itself kept as ``<upstream stage>.<name>``); dead runs are left to the driver."""
    exp = store.experiment_id("e")
    client = mlflow.MlflowClient()
    dead = client.create_run(exp, tags={"stage": "train",
                                        OWNER_TAG: f"{socket.gethostname()}:{2**22 + 1}:1"})
    ctx = {"experiment": "e", "tags": {"scylla.attempt": "a1", OWNER_TAG: "driver:1:1"},
           "labels": {"variant": "scylla", "seed": "from-label"},
           "upstream": {"stage": "train", "params": {"seed": "3", "train_tokens": "1000"}}}
    with paths.environment({tracking.CONTEXT_ENV: json.dumps(ctx)}):
        assert tracking.run_context() == ctx
        with stage_run("decode", {"seed": 7, "draft": None}) as run:
            pass
    got = mlflow.get_run(run.info.run_id)
    assert got.info.experiment_id == exp
    assert got.data.params == {"train.seed": "3", "train_tokens": "1000", "variant": "scylla",
                               "seed": "7", "draft": ""}
    assert {k: v for k, v in got.data.tags.items() if not k.startswith("mlflow.")} == {
        "stage": "decode", "scylla.attempt": "a1", OWNER_TAG: "driver:1:1"}
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"
    # the same stage run by hand in that experiment closes the dead process's run
    with stage_run("decode", {}, experiment="e"):
        pass
    assert client.get_run(dead.info.run_id).info.status == "KILLED"


def test_a_run_a_dead_process_left_running_is_closed_by_the_next_stage_run():
    exp = store.experiment_id()  # points MLflow at this test's store first
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    owners = {"dead": f"{host}:{2**22 + 1}:1",  # above Linux's largest pid: no such process
              "live": owner_id(os.getppid()),  # alive while this test runs
              "remote": f"not-{host}:1:1", "untagged": None}
    left = {name: client.create_run(exp, tags={"stage": "train", **({OWNER_TAG: o} if o else {})}
                                    ).info.run_id
            for name, o in owners.items()}
    with stage_run("decode", {}) as run:
        pass
    status = {name: client.get_run(rid).info.status for name, rid in left.items()}
    assert status == {"dead": "KILLED", "live": "RUNNING", "remote": "RUNNING",
                      "untagged": "RUNNING"}
    assert mlflow.get_run(run.info.run_id).data.tags[OWNER_TAG] == owner_id()


def test_default_store_is_sqlite_under_mlruns(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert paths.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def test_a_store_dir_moves_the_store_and_its_artifacts_out_of_the_checkout(monkeypatch, tmp_path):
    """`scylla main` writes to out/mlruns this way, leaving the committed mlruns/ untouched."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with paths.environment({"SCYLLA_STORE_DIR": str(tmp_path / "out" / "mlruns")}):
        with stage_run("train", {}) as run:
            mlflow.log_dict({"made": "out"}, "draft.json")
        assert paths.tracking_uri() == f"sqlite:///{tmp_path / 'out' / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "out" / "mlruns" / "mlflow.db").is_file()
    assert (tmp_path / "out" / "mlruns" / "artifacts" / "scylla" / run.info.run_id).is_dir()
    assert not (tmp_path / "mlruns").exists() and "SCYLLA_STORE_DIR" not in os.environ


def test_a_store_cloned_to_another_checkout_keeps_its_artifacts_there(monkeypatch, tmp_path):
    """MLflow records artifact locations as absolute paths; the project store opened in a
    clone at another path points its experiments and runs at the clone's mlruns/artifacts."""
    import json
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    first, clone = tmp_path / "first", tmp_path / "clone"
    monkeypatch.setenv("SCYLLA_PROJECT_DIR", str(first))
    with stage_run("train", {}) as old:
        mlflow.log_dict({"made": "first"}, "draft.json")
    shutil.copytree(first / "mlruns", clone / "mlruns")
    shutil.rmtree(first)
    monkeypatch.setenv("SCYLLA_PROJECT_DIR", str(clone))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it
    with stage_run("train", {}) as new:
        mlflow.log_dict({"made": "clone"}, "draft.json")
    assert not first.exists()
    root = clone / "mlruns" / "artifacts" / "scylla"
    assert (root / new.info.run_id / "artifacts" / "draft.json").is_file()
    moved = mlflow.get_run(old.info.run_id).info.artifact_uri
    assert moved == (root / old.info.run_id / "artifacts").as_uri()
    got = mlflow.artifacts.download_artifacts(run_id=old.info.run_id, artifact_path="draft.json",
                                              dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text()) == {"made": "first"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_opens_on_the_store(tmp_path):
    with stage_run("train", {"draft_n_layer": 1}):
        pass
    port = _free_port()
    ui = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
         paths.tracking_uri(), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            try:
                url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search"
                body = urllib.request.urlopen(
                    urllib.request.Request(url, data=b'{"max_results": 10}',
                                           headers={"Content-Type": "application/json"}),
                    timeout=5).read().decode()
                break
            except OSError:
                assert ui.poll() is None, "mlflow ui exited"
                assert time.time() < deadline, "mlflow ui did not answer within 90 s"
                time.sleep(1)
        assert '"name": "scylla"' in body or '"name":"scylla"' in body
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"<html" in page.lower()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
