"""The MLflow UI shows a sweep's runs in a real headless browser (Chromium).

A simulated sweep fills the test's store, `mlflow server` serves it, and Chromium renders the
experiment's runs page: MLflow's UI is a React app whose HTML holds no run until its scripts
have fetched them, so only a browser shows that the UI works on our store. Chromium is a
system package: `make test-slow` installs it (`apt-get install -y chromium`) when missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from sweep_fixtures import TINY

from scylla.experiments import load_sweep
from scylla.pipeline.sweep import run_sweep

WINDOW = (1400, 900)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` "
                    "(`make test-slow` installs it when missing)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store: Path, artifacts: Path, log: Path):
    """`mlflow server` on ``store``; yields its URL once it answers /health."""
    port = free_port()
    # without job execution the server starts no background job workers (7 processes)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{store}", "--default-artifact-root", str(artifacts),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a cold start on a busy 2-core machine takes ~10 s
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()}"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"mlflow server not up:\n{log.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        proc.wait(timeout=60)


def headless(url: str, profile: Path, *flags: str) -> str:
    """Chromium's stdout after rendering ``url``; the virtual-time budget lets the app's
    scripts and requests finish first."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={profile}", "--virtual-time-budget=15000", *flags, url],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"chromium failed on {url}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_runs_in_chromium(mlflow_store, tmp_path):
    from PIL import Image

    chromium()  # fail first, not after the sweep, when it is missing
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(TINY)
    result = run_sweep(load_sweep(sweep), "quick", simulate=True, log=lambda s: None)
    exp = mlflow.get_experiment_by_name(result.experiment)
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1 + 3 + 3 * 2 * 2 + 1  # hidden states, train, decode x method, fit

    shot = tmp_path / "runs.png"
    with mlflow_server(mlflow_store, tmp_path / "mlruns" / "artifacts",
                       tmp_path / "server.log") as url:
        # MLflow 3 opens an experiment on its GenAI overview; this is the runs table
        page = f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        dom = headless(page, tmp_path / "chromium", "--dump-dom")
        headless(page, tmp_path / "chromium", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 f"--screenshot={shot}")

    assert result.experiment in dom
    missing = sorted({r.info.run_name for r in runs if r.info.run_name not in dom})
    assert not missing, f"runs not shown by the UI: {missing}"
    with Image.open(shot) as image:
        assert image.size == WINDOW
        darkest, lightest = image.convert("L").getextrema()
    assert lightest - darkest > 100, f"{shot} is blank"
