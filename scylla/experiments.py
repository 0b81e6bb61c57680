"""Sweep files: ``pipelines/sweeps/<name>.yaml``, one per theorem, with profiles.

    name: theorem_1_1_data        # the MLflow experiment is "<name>-<profile>"
    claim: theorem_1_1            # key of scylla.analysis.claims.CLAIMS
    common:                       # merged (deeply) under every profile
      hidden_states: {params: {target: smollm2-135m-instruct}}
    profiles:
      quick:
        hidden_states: {params: {...}}            # a stage without grid: one call
        train:
          params: {draft_n_layer: 1}              # passed to the stage as --flags
          grid: {train_tokens: [...], seed: [0, 1]}   # cross product, per upstream run
        decode:
          grid:
            tree: [{tree_top_k: 2, tree_total_tokens: 8}, ...]   # a list of mappings sets
                                                                  # several params at once
        fits:
          - {name: tau_vs_tokens, stage: train, x: train_tokens, y: val/tau_chain, unit: seed}
          # keys: name, stage, x, y, unit, paired, filter, best_by (see ``scylla fit --help``)

Stages run in ``STAGE_ORDER``; each stage's grid is expanded once per run of the stage
before it. A profile drops a stage that ``common`` declares with ``<stage>: false`` (a
decode-only profile decodes a draft its params name, such as the shipped one). A grid
mapping may hold ``variant`` (a label: logged as a param and carried to downstream runs,
never passed to the stage).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scylla import paths
from scylla.errors import ConfigError

STAGE_ORDER = ("hidden_states", "train", "decode")
PROFILE_ENV = "SCYLLA_PROFILE"  # the profile commands and notebooks use when none is named
DEFAULT_PROFILE = "quick"


def default_profile() -> str:
    """``$SCYLLA_PROFILE``, else ``quick`` (minutes on a CPU; ``paper`` takes hours)."""
    return os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
LABEL_KEYS = ("variant",)
FIT_KEYS = ("name", "stage", "x", "y", "unit", "paired", "filter", "best_by")


@dataclass(frozen=True)
class Point:
    params: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)  # the values the grid set

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items()) or "(no grid)"


@dataclass(frozen=True)
class StagePlan:
    stage: str
    params: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self) -> list[Point]:
        """Every combination of the grid's axes, in file order (the last axis varies
        fastest), on top of ``params``."""
        out = []
        for combo in itertools.product(*self.grid.values()):
            params, labels, axes = dict(self.params), {}, {}
            for axis, value in zip(self.grid, combo):
                for k, v in (value.items() if isinstance(value, dict) else [(axis, value)]):
                    axes[k] = v
                    if k in LABEL_KEYS:
                        labels[k] = str(v)
                    else:
                        params[k] = v
            out.append(Point(params, labels, axes))
        return out


@dataclass(frozen=True)
class Profile:
    name: str
    stages: dict[str, StagePlan]
    fits: list[dict[str, Any]]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path
    claim: str
    description: str
    profiles: dict[str, Profile]

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise ConfigError(f"{self.path}: no profile {name!r}; it has "
                              f"{', '.join(self.profiles)}")
        return self.profiles[name]


def experiment_name(sweep: str, profile: str, simulated: bool = False) -> str:
    """The MLflow experiment of a sweep's profile; simulated runs never mix with real ones."""
    return f"{sweep}-{profile}" + ("-simulated" if simulated else "")


def sweeps_dir() -> Path:
    """``pipelines/sweeps`` of the project (``SCYLLA_PROJECT_DIR``/cwd), else of this
    checkout."""
    for root in (paths.project_dir(), Path(__file__).resolve().parents[1]):
        if (root / "pipelines" / "sweeps").is_dir():
            return root / "pipelines" / "sweeps"
    raise ConfigError("no pipelines/sweeps directory in the project dir or beside the package")


def sweep_paths() -> list[Path]:
    return sorted(sweeps_dir().glob("*.yaml"))


def _merge(base: Any, over: Any) -> Any:
    if over is False:  # a stage dropped by a profile
        return False
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over if over is not None else base


def _stage(where: str, stage: str, body: Any) -> StagePlan:
    if not isinstance(body, dict) or set(body) - {"params", "grid"}:
        raise ConfigError(f"{where}.{stage}: expected a mapping with 'params' and/or 'grid'")
    params = body.get("params") or {}
    grid = body.get("grid") or {}
    if not isinstance(params, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{where}.{stage}: 'params' and 'grid' must be mappings")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{stage}.grid.{axis}: expected a non-empty list")
    return StagePlan(stage, params, grid)


def _fit(where: str, i: int, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"{where}.fits[{i}]: expected a mapping")
    unknown = set(body) - set(FIT_KEYS)
    missing = {"name", "stage", "x", "y"} - set(body)
    if unknown or missing:
        raise ConfigError(f"{where}.fits[{i}]: unknown keys {sorted(unknown)}, missing "
                          f"{sorted(missing)}; allowed: {', '.join(FIT_KEYS)}")
    return {k: (bool(body.get(k)) if k == "paired" else str(body.get(k, ""))) for k in FIT_KEYS}


def _profile(path: Path, name: str, body: Any) -> Profile:
    where = f"{path.name}: profiles.{name}"
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(body) - {*STAGE_ORDER, "fits"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: "
                          f"{', '.join([*STAGE_ORDER, 'fits'])}")
    stages = {s: _stage(where, s, body[s]) for s in STAGE_ORDER
              if s in body and body[s] is not False}
    fits = [_fit(where, i, f) for i, f in enumerate(body.get("fits") or [])]
    return Profile(name, stages, fits)


def load_sweep(name_or_path: str | Path) -> SweepSpec:
    """A sweep by file path or by name (``pipelines/sweeps/<name>.yaml``)."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = sweeps_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'profiles' mapping")
    common = doc.get("common") or {}
    profiles = {name: _profile(path, name, _merge(common, body))
                for name, body in doc["profiles"].items()}
    return SweepSpec(name=str(doc.get("name") or path.stem), path=path,
                     claim=str(doc.get("claim", "")),
                     description=str(doc.get("description", "")), profiles=profiles)
