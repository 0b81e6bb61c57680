"""Sweep files, the sweep driver and run reuse: a killed sweep restarted finishes only what
is missing, with exactly one FINISHED run per grid point and nothing half-logged used."""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from sweep_fixtures import TINY

from scylla import store
from scylla.commands.mlproject import parse_pairs, stage_entry
from scylla.errors import ConfigError, DataError
from scylla.experiments import load_sweep, sweep_paths
from scylla.pipeline import machine, reuse, stages, tracking
from scylla.pipeline import owner as process_owner
from scylla.pipeline.reuse import StageBusyError, execute
from scylla.pipeline.stages import StageCall, StageFailedError, to_argv
from scylla.pipeline.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


# -- sweep files ---------------------------------------------------------------------------------

def axis(spec, profile, stage, name):
    plan = spec.profile(profile).stages[stage]
    return sorted({p.params[name] for p in plan.points()})


def test_the_four_sweep_files_cover_what_the_issue_asks():
    names = {p.stem for p in sweep_paths()}
    assert names == {"theorem_1_1_data", "theorem_1_2_capacity", "theorem_1_3_batch",
                     "baselines"}
    t11 = load_sweep("theorem_1_1_data")
    for profile in ("quick", "paper"):
        tokens = axis(t11, profile, "train", "train_tokens")
        assert len(tokens) >= 5 and math.log10(max(tokens) / min(tokens)) >= 1.5
        assert len(axis(t11, profile, "train", "seed")) >= 2
    t12 = load_sweep("theorem_1_2_capacity")
    assert {"quick", "paper"} <= set(t12.profiles)
    for profile in t12.profiles:
        assert axis(t12, profile, "train", "draft_n_layer") == [1, 2, 3, 4, 6, 8]
        assert len(axis(t12, profile, "train", "seed")) >= 2
        assert len(axis(t12, profile, "train", "train_tokens")) == 1
    # the rerun without the vocabulary confound: one vocabulary for every point, 3 seeds
    for spec in (t11, t12):
        plan = spec.profile("fixed_vocab").stages["train"]
        assert {p.params["vocab"] for p in plan.points()} == {"corpus"}
        assert len({p.params["vocab_tokens"] for p in plan.points()}) == 1
        assert axis(spec, "fixed_vocab", "train", "seed") == [0, 1, 2]
    tokens = axis(t11, "fixed_vocab", "train", "train_tokens")
    assert math.log10(max(tokens) / min(tokens)) >= 1.5
    assert any(f["y"].startswith("val_on/") for f in t11.profile("fixed_vocab").fits)
    t13 = load_sweep("theorem_1_3_batch")
    assert axis(t13, "paper", "decode", "decode_batch_size") == [1, 2, 4, 8, 16, 32]
    assert len(axis(t13, "paper", "decode", "tree_total_tokens")) >= 3
    # the redo: the shipped draft, decode only, timed rounds per cell, fits resampling rounds
    shipped = t13.profile("shipped")
    assert set(shipped.stages) == {"decode"}
    (point, *_) = shipped.stages["decode"].points()
    assert point.params["draft"] == "default" and point.params["prompts"] == "spec-bench"
    assert point.params["repeats"] >= 3
    assert axis(t13, "shipped", "decode", "tree_total_tokens")[0] == 1
    assert {f["unit"] for f in shipped.fits} == {"repeat"}
    base = load_sweep("baselines")
    for profile in ("quick", "paper"):
        drafts = {p.labels["variant"]: p.params
                  for p in base.profile(profile).stages["train"].points()}
        assert set(drafts) == {"eagle2-style", "eagle3", "scylla"}
        e2, sc = drafts["eagle2-style"], drafts["scylla"]
        assert e2["draft_n_layer"] == 1 and not e2.get("pretrain_tokens")
        assert drafts["eagle3"]["kind"] == "eagle3"
        assert sc["draft_n_layer"] > 1 and sc["train_tokens"] > e2["train_tokens"]
        assert sc["pretrain_tokens"] > 0


def test_sweep_flags_parse_with_the_real_stage_clis():
    """Every stage's params are flags of its `scylla` subcommand (a typo fails here, not
    after hours of a sweep)."""
    from scylla.commands.cli import SUBCOMMANDS
    from scylla.pipeline.stages import STAGES
    from scylla.pipeline.sweep import _check_flags

    missing = [w.subcommand for w in STAGES.values() if w.subcommand not in SUBCOMMANDS]
    if missing:
        pytest.skip(f"stage CLIs not in this checkout yet: {missing}")
    for path in sweep_paths():
        spec = load_sweep(path)
        for profile in spec.profiles:
            _check_flags(spec, profile)


def write_sweep(tmp_path, body: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_grid_expansion_zipped_axes_and_labels(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, """
        name: tiny
        common: {train: {params: {kind: scylla}}}
        profiles:
          quick:
            train:
              params: {lr: 0.001}
              grid:
                draft: [{variant: a, draft_n_layer: 1}, {variant: b, draft_n_layer: 2}]
                seed: [0, 1]
    """))
    points = spec.profile("quick").stages["train"].points()
    assert [(p.labels["variant"], p.params["seed"]) for p in points] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert points[2].params == {"kind": "scylla", "lr": 0.001, "draft_n_layer": 2, "seed": 0}
    assert "variant" not in points[0].params
    assert points[3].describe() == "variant=b draft_n_layer=2 seed=1"


def test_a_profile_drops_a_stage_that_common_declares(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, """
        name: tiny
        common: {train: {params: {kind: scylla}}, decode: {params: {methods: plain}}}
        profiles:
          full: {}
          decode_only: {train: false, decode: {params: {draft: default}}}
    """))
    assert set(spec.profile("full").stages) == {"train", "decode"}
    only = spec.profile("decode_only").stages
    assert set(only) == {"decode"}
    assert only["decode"].points()[0].params == {"methods": "plain", "draft": "default"}


@pytest.mark.parametrize("body, message", [
    ("profiles: {quick: {trian: {}}}", "unknown keys \\['trian'\\]"),
    ("profiles: {quick: {train: {grid: {seed: 3}}}}", "grid.seed: expected a non-empty list"),
    ("profiles: {quick: {fits: [{name: a, x: b}]}}", "missing \\['stage', 'y'\\]"),
    ("name: [", "not valid YAML"),
])
def test_bad_sweep_files_name_the_field(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, body))


def test_unknown_profile_and_file():
    with pytest.raises(ConfigError, match="no profile 'huge'"):
        load_sweep("theorem_1_1_data").profile("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep("no_such_sweep")


def test_a_missing_input_file_fails_every_sweep_before_any_runs(tmp_path, monkeypatch):
    """The main job checks all sweep files first: a prompts file missing in the last sweep
    fails at once, naming the file, before the first sweep spends minutes."""
    from scylla.pipeline import sweep

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    decode = "{decode: {params: {methods: plain, prompts: %s}}}"
    good = write_sweep(tmp_path, "profiles: {quick: %s}" % (decode % prompts))
    bad = good.with_name("bad.yaml")
    bad.write_text("profiles: {quick: %s}" % (decode % (tmp_path / "gone.jsonl")))
    started = []
    monkeypatch.setattr(sweep, "sweep_paths", lambda: [good, bad])
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, *a, **k: started.append(spec.name))
    with pytest.raises(ConfigError, match=r"bad.yaml: decode prompts=.*gone.jsonl: no such file"):
        sweep.run_all("quick")
    assert started == []
    bad.write_text("profiles: {quick: %s}" % (decode % prompts))
    sweep.run_all("quick")
    assert started == ["tiny", "bad"]


def test_flags_and_pairs():
    assert to_argv({"train_tokens": 10, "no_progress": True, "online": False, "draft": None}) == [
        "--train-tokens", "10", "--no-progress", "--no-online"]
    assert parse_pairs(["--train_tokens", "10", "--upstream-run-id=abc", "--x", ""]) == {
        "train_tokens": "10", "upstream_run_id": "abc", "x": ""}
    with pytest.raises(ConfigError, match="missing value"):
        parse_pairs(["--a"])


def test_every_stage_runs_a_command_of_the_cli_and_an_unknown_stage_is_a_clear_error():
    from scylla.commands.cli import SUBCOMMANDS
    from scylla.pipeline.stages import STAGES, stage_module_name

    for stage, wiring in STAGES.items():
        assert SUBCOMMANDS[wiring.subcommand][0] == stage_module_name(stage), stage
    with pytest.raises(ConfigError, match="unknown stage 'decoder'; stages: hidden_states"):
        stage_module_name("decoder")


# -- reuse -----------------------------------------------------------------------------------------

def fake_stage(call: StageCall) -> None:
    with tracking.stage_run(call.stage, call.params):
        mlflow.log_metric("m", 1.0)


def finished(experiment="e"):
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              output_format="list")


def test_a_finished_call_is_reused_and_a_changed_one_is_not(mlflow_store, monkeypatch):
    call = StageCall("train", {"train_tokens": 10}, "e")
    first = execute(call, fake_stage)
    again = execute(StageCall("train", {"train_tokens": 10}, "e"), fake_stage)
    assert not first.reused and again.reused
    assert again.runs[0].info.run_id == first.runs[0].info.run_id
    assert again.runs[0].data.tags["scylla.complete"] == "1"
    assert again.runs[0].data.tags["machine"] == machine.description()  # where it ran
    assert not execute(StageCall("train", {"train_tokens": 20}, "e"), fake_stage).reused
    monkeypatch.setattr(stages, "code_version", lambda call: "other-code")
    assert not execute(call, fake_stage).reused  # new code: run again
    assert len(finished()) == 3


def dead_attempt(call: StageCall, status: str) -> str:
    """Runs of an attempt whose owner process no longer exists (pid 2**22 + 1 is above
    Linux's pid_max default, so it is never alive)."""
    ctx = reuse.context(call, "dead")
    ctx["tags"]["scylla.owner"] = f"{socket.gethostname()}:{2**22 + 1}:1"
    client = mlflow.MlflowClient()
    exp = store.experiment_id(call.experiment)
    run = client.create_run(exp, tags={"stage": call.stage, **ctx["tags"]})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_an_attempt_whose_owner_died_is_marked_killed_and_rerun(mlflow_store):
    call = StageCall("train", {"train_tokens": 10}, "e")
    stale = dead_attempt(call, "RUNNING")
    out = execute(call, fake_stage)
    assert not out.reused
    old = mlflow.get_run(stale)
    assert old.info.status == "KILLED" and old.data.tags["scylla.incomplete"] == "RUNNING"
    assert [r.info.run_id for r in finished()] == [out.runs[0].info.run_id]


def test_a_live_owner_is_not_run_over(mlflow_store):
    call = StageCall("train", {"train_tokens": 10}, "e")
    ctx = reuse.context(call, "live")
    parent = os.getppid()  # alive while this test runs
    ctx["tags"]["scylla.owner"] = process_owner.owner_id(parent)
    mlflow.MlflowClient().create_run(store.experiment_id("e"),
                                     tags={"stage": "train", **ctx["tags"]})
    with pytest.raises(StageBusyError, match="is being run by process"):
        execute(call, fake_stage)


def test_a_failing_stage_marks_its_runs_failed(mlflow_store):
    def boom(call):
        with tracking.stage_run(call.stage, call.params):
            raise RuntimeError("boom")

    call = StageCall("train", {"train_tokens": 10}, "e")
    with pytest.raises(RuntimeError):
        execute(call, boom)
    (run,) = mlflow.search_runs([store.experiment_id("e")], output_format="list")
    assert run.info.status == "FAILED" and "scylla.incomplete" in run.data.tags
    assert not execute(call, fake_stage).reused


def test_a_stage_that_logs_nothing_is_an_error(mlflow_store):
    with pytest.raises(StageFailedError, match="without logging an MLflow run"):
        execute(StageCall("train", {}, "e"), lambda call: None)


def test_a_resumed_run_is_claimed_by_the_new_attempt(mlflow_store):
    """`scylla train` after a kill resumes its MLflow run from the checkpoint."""
    call = StageCall("train", {"train_tokens": 10}, "e")
    stale = dead_attempt(call, "RUNNING")

    def resume(call):
        with mlflow.start_run(run_id=stale):
            mlflow.log_metric("m", 2.0)

    out = execute(call, resume)
    assert [r.info.run_id for r in out.runs] == [stale]
    run = mlflow.get_run(stale)
    assert run.info.status == "FINISHED"
    assert "scylla.incomplete" not in run.data.tags and run.data.tags["scylla.complete"] == "1"
    assert execute(call, fake_stage).reused


def test_work_found_done_adopts_the_finished_run(mlflow_store):
    """Killed after the stage's run finished but before the driver tagged it: on restart
    the stage reports its result without a new run (`scylla train` with result.json)."""
    call = StageCall("train", {"train_tokens": 10}, "e")
    done = dead_attempt(call, "FINISHED")
    out = execute(call, lambda call: None)
    assert [r.info.run_id for r in out.runs] == [done]
    assert out.runs[0].info.status == "FINISHED"


# -- a sweep killed mid-run and restarted ---------------------------------------------------------


def runs_of(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return [] if exp is None else mlflow.search_runs([exp.experiment_id], output_format="list")


def test_a_killed_sweep_restarted_finishes_once_per_point(mlflow_store, tmp_path):
    path = write_sweep(tmp_path, TINY)
    env = {**os.environ, "SCYLLA_SIMULATE_SECONDS": "0.4", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scylla.commands.cli", "sweep", str(path),
                             "--profile", "quick", "--simulate"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:  # kill it inside a run, after a few runs have finished
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the sweep did not get going"
            statuses = [r.info.status for r in runs_of("tiny-quick-simulated")]
            if statuses.count("FINISHED") >= 4 and "RUNNING" in statuses:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r.info.run_id: r.info.status for r in runs_of("tiny-quick-simulated")}
    assert "RUNNING" in before.values()

    os.environ["SCYLLA_SIMULATE_SECONDS"] = "0"
    try:
        result = run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None)
    finally:
        del os.environ["SCYLLA_SIMULATE_SECONDS"]
    assert result.reused >= 3 and result.new >= 1

    runs = runs_of("tiny-quick-simulated")
    done = [r for r in runs if r.info.status == "FINISHED"]
    per_point = {}
    for r in done:
        key = (r.data.tags["stage"], r.data.tags["scylla.point_key"], r.data.params.get("method"))
        per_point.setdefault(key, []).append(r.info.run_id)
    assert all(len(ids) == 1 for ids in per_point.values()), per_point
    stages = [k[0] for k in per_point]
    assert (stages.count("hidden_states"), stages.count("train"), stages.count("decode"),
            stages.count("fit")) == (1, 3, 3 * 2 * 2, 1)
    # nothing lost: every finished run has its metrics; what was finished before is kept
    assert all(r.data.metrics for r in done)
    assert all(before[r.info.run_id] == "FINISHED" for r in done if r.info.run_id in before)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and all(r.data.tags.get("scylla.incomplete") for r in killed)
    assert {rid for rid, st in before.items() if st == "RUNNING"} <= {r.info.run_id
                                                                      for r in killed}
    # and a third start has nothing left to do
    again = run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None)
    assert again.new == 0


def test_outputs_gone_from_this_machine_are_made_again_only_when_needed(mlflow_store, tmp_path):
    """A store cloned without its outputs (or a cleared cache): a sweep with nothing new reuses
    every run; a new decode point makes its draft (and the draft its shards) again, once."""
    import shutil

    from scylla import paths

    path = write_sweep(tmp_path, TINY)
    first = run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None)
    shutil.rmtree(paths.data_dir())  # every shard and draft directory
    again = run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None)
    assert again.new == 0 and again.reused == first.new + first.reused

    path.write_text(TINY.replace("decode_batch_size: [1, 2]", "decode_batch_size: [1, 2, 4]"))
    lines = []
    grown = run_sweep(load_sweep(path), "quick", simulate=True, log=lines.append)
    remade = [line for line in lines if "is not on this machine" in line]
    assert sorted(line.split("]")[1].split(":")[0].strip() for line in remade) == [
        "hidden_states", "train", "train", "train"]
    # the three new decode points, and the fit, whose input runs are now the remade drafts;
    # the remakes themselves are logged, not counted
    assert grown.new == 4
    runs = runs_of("tiny-quick-simulated")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sum(r.data.tags["stage"] == "train" for r in finished) == 6  # 3 made twice
    assert sum(r.data.tags["stage"] == "decode" for r in finished) == 3 * 3 * 2
    from scylla.pipeline.stages import output_gone
    trains = [r for r in finished if r.data.tags["stage"] == "train"]
    # the remade drafts are on disk, in their point's directory, where the old runs' tags point
    assert not any(output_gone(r) for r in trains)
    # the remade runs are now the ones reused
    assert run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None).new == 0


def test_a_fit_of_a_metric_no_run_has_yet_is_left_for_later(mlflow_store, tmp_path):
    """A fit of a metric a later command logs into the runs (`scylla validate`) is skipped with
    a line saying so; the other fits run, and the sweep fits it once the runs carry it."""
    path = write_sweep(tmp_path, TINY + "      - {name: later, stage: train, x: train_tokens, "
                       "y: val_on/x/tau_chain}\n")
    lines = []
    first = run_sweep(load_sweep(path), "quick", simulate=True, log=lines.append)
    assert set(first.fits) == {"tau"}
    assert any("fit later: not fitted: no train run has val_on/x/tau_chain yet" in line
               for line in lines)
    client = mlflow.MlflowClient()
    for run in runs_of("tiny-quick-simulated"):
        if run.data.tags["stage"] == "train":
            client.log_metric(run.info.run_id, "val_on/x/tau_chain",
                              run.data.metrics["val/tau_chain"] + 0.1)
    again = run_sweep(load_sweep(path), "quick", simulate=True, log=lambda s: None)
    assert set(again.fits) == {"tau", "later"}
    assert again.fits["later"]["law/slope"] == pytest.approx(first.fits["tau"]["law/slope"])


# -- MLproject entry points ------------------------------------------------------------------------

def test_stage_entry_reuses_under_a_launcher_run(mlflow_store, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient()
    launchers = []
    for _ in range(2):
        launcher = client.create_run(store.experiment_id("mlp"))
        launchers.append(launcher.info.run_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
        assert stage_entry("hidden_states", ["--simulate", "true", "--build_tokens", "5000"],
                           tmp_path) == 0
    first, second = (mlflow.get_run(i).data.tags for i in launchers)
    assert first["scylla.reused"] == "0" and second["scylla.reused"] == "1"
    assert first["scylla.stage_runs"] == second["scylla.stage_runs"]
    (run,) = [r for r in runs_of("mlp") if r.data.tags.get("stage") == "hidden_states"]
    assert run.data.tags["mlflow.parentRunId"] == launchers[0]
    launcher = client.create_run(store.experiment_id("mlp"))
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    assert stage_entry("train", ["--simulate", "true", "--upstream_run_id", run.info.run_id,
                                 "--train_tokens", "1000"], tmp_path) == 0
    (train,) = [r for r in runs_of("mlp") if r.data.tags.get("stage") == "train"]
    assert train.data.params["shards"] == run.data.tags["shards"]
    assert train.data.params["build_tokens"] == "5000"  # lineage
    assert "MLFLOW_RUN_ID" not in os.environ  # consumed: the stage must not resume it
    # without a launcher, runs go to the experiment named by log_experiment
    assert stage_entry("train", ["--simulate", "true", "--upstream_run_id", run.info.run_id,
                                 "--train_tokens", "4000", "--log_experiment", "mlp"],
                       tmp_path) == 0
    assert stage_entry("fit", ["--experiment", "mlp", "--stage", "train", "--x", "train_tokens",
                               "--y", "val/tau_chain", "--log_experiment", "mlp"], tmp_path) == 0
    (fit,) = [r for r in runs_of("mlp") if r.data.tags.get("stage") == "fit"]
    assert fit.data.metrics["law/slope"] > 0 and fit.data.params["n_inputs"] == "2"


@pytest.mark.slow
def test_mlflow_run_entry_points(mlflow_store, tmp_path):
    """`mlflow run pipelines -e sweep` end to end (simulated stages), then reused."""
    path = write_sweep(tmp_path, TINY)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT / "pipelines"), "-e",
           "sweep", "-P", f"sweep={path}", "-P", "simulate=true", "--env-manager", "local",
           "--experiment-name", "launch"]
    for _ in range(2):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "0 run, 11 reused" in out.stdout + out.stderr
    done = [r for r in runs_of("tiny-quick-simulated") if r.info.status == "FINISHED"]
    assert len(done) == 1 + 3 + 12 + 1


# the target cache as the session found it: mlflow_store points SCYLLA_DATA_DIR at the test's
# directory, where the real target would be converted again
DATA_DIR = os.environ.get("SCYLLA_DATA_DIR")


@pytest.mark.slow
@pytest.mark.real
def test_mlflow_run_runs_a_real_decode_stage_and_then_reuses_it(mlflow_store, monkeypatch):
    """One real stage through `mlflow run`: the shipped draft decodes 2 Spec-Bench prompts on
    the real target, a run per method under the project run, chain exact against plain; the
    same call again reuses both runs and decodes nothing."""
    if DATA_DIR is None:
        monkeypatch.delenv("SCYLLA_DATA_DIR")
    else:
        monkeypatch.setenv("SCYLLA_DATA_DIR", DATA_DIR)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT / "pipelines"), "-e",
           "decode", "-P", "draft=default", "-P", "methods=plain,chain", "-P",
           "prompts=spec-bench", "-P", "num_prompts=2", "-P", "max_new_tokens=8",
           "--env-manager", "local", "--experiment-name", "real-stage"]
    outs = []
    for _ in range(2):
        # cwd: MLflow puts a new experiment's artifacts under ./mlruns, not in the checkout
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                             cwd=mlflow_store.parent)
        assert out.returncode == 0, out.stdout + out.stderr
        outs.append(out.stdout + out.stderr)
    assert "decode: ran run(s)" in outs[0] and "decode: ran" not in outs[1]
    decodes = [r for r in runs_of("real-stage") if r.data.tags.get("stage") == "decode"]
    assert sorted(r.data.params["method"] for r in decodes) == ["chain", "plain"]
    for r in decodes:
        assert r.info.status == "FINISHED" and r.data.params["prompts"] == "spec-bench"
        assert r.data.metrics["decode/exact_match"] == 1.0
        assert "mlflow.parentRunId" in r.data.tags  # logged under `mlflow run`'s own run


def test_a_stage_under_a_driver_leaves_its_report_to_the_driver(capsys):
    """Stages print their own tables and results when run by hand; inside a sweep the runner
    prints one line per call instead, so the main job's output stays readable."""
    import json as json_module

    from scylla import paths
    from scylla.commands.cli import say

    say("by hand")
    with paths.environment({tracking.CONTEXT_ENV: json_module.dumps({"experiment": "e"})}):
        say("under a driver")
    assert capsys.readouterr().out == "by hand\n"


def test_a_simulated_sweep_refuses_the_real_shipped_draft_by_name(mlflow_store):
    with pytest.raises(DataError, match="--draft default names the real shipped draft"):
        run_sweep(load_sweep("theorem_1_3_batch"), "shipped", simulate=True, log=lambda s: None)
