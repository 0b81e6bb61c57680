"""The tracking store: stage runs land in SQLite, and the MLflow UI serves that store."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

from scylla import paths
from scylla.tracking import stage_run


def test_stage_run_logs_params_and_stage_tag():
    with stage_run("decode", {"decode_batch_size": 4, "draft": None}) as run:
        mlflow.log_metric("decode/tau", 2.5)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.tags["stage"] == "decode"
    assert got.data.params == {"decode_batch_size": "4", "draft": ""}
    assert got.data.metrics["decode/tau"] == 2.5
    assert paths.tracking_uri().startswith("sqlite:///")


def test_default_store_is_sqlite_under_mlruns(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert paths.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


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
