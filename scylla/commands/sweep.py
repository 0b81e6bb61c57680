"""``scylla sweep``: run sweep files (``pipelines/sweeps``) stage by stage, reusing runs.

The runner is ``scylla.pipeline.sweep``; this module is its command line. SIGTERM unwinds
like Ctrl-C, so the running attempt is marked KILLED at once and the next start resumes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from scylla.commands.cli import add_profile_argument
from scylla.errors import ConfigError
from scylla.experiments import load_sweep, sweep_paths
from scylla.pipeline.dispatch import BACKENDS, Backend
from scylla.pipeline.sweep import LAUNCHER_ENV, run_sweep


def _sigterm_as_exit(signum: int, frame: Any) -> None:
    # SystemExit unwinds through reuse.execute, which marks the running attempt KILLED
    raise SystemExit(128 + signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweeps", nargs="*", help="Sweep names (pipelines/sweeps/<name>.yaml) "
                        "or YAML paths; default: all of them.")
    add_profile_argument(parser, "Profile in each file")
    parser.add_argument("--simulate", action="store_true",
                        help="Replace hidden_states/train/decode with stand-ins (seconds) to "
                             "check files, wiring, reuse, fits and notebooks.")
    parser.add_argument("--takeover", action="store_true",
                        help="Treat unfinished runs owned by another host as dead.")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="Dispatch each hidden_states/train/decode call as an MLflow "
                             "project run of pipelines/MLproject on this MLflow backend "
                             "instead of running it here (fits still run here); see "
                             "docs/scale-out.md.")
    parser.add_argument("--backend-config", default=None,
                        help="JSON file passed to the backend (Databricks: the cluster spec; "
                             "Kubernetes: kube-context, repository-uri, "
                             "kube-job-template-path).")
    parser.add_argument("--parallel", action="store_true",
                        help="With --backend: submit every call of a stage at once and wait "
                             "for all (default: one after the other).")


def run(args: argparse.Namespace) -> int:
    backend = None
    if args.backend:
        backend = Backend(args.backend, args.backend_config, parallel=args.parallel)
    elif args.backend_config or args.parallel:
        raise ConfigError("--backend-config and --parallel need --backend")
    signal.signal(signal.SIGTERM, _sigterm_as_exit)
    paths = args.sweeps or [str(p) for p in sweep_paths()]
    if not paths:
        raise ConfigError("no sweep files found")
    # under `mlflow run -e sweep`, the project's run is the parent of the runs started here
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    for p in paths:
        run_sweep(load_sweep(p), args.profile, simulate=args.simulate, takeover=args.takeover,
                  parent_run_id=launcher, backend=backend)
        sys.stdout.flush()
    return 0
