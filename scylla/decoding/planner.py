"""The planner behind ``--tree auto``: the tree that pays most on this machine at this batch size.

A speculative step's speed is E[accepted length] / E[step cost] (EAGLE-2, Sequoia); both are
measured here, never assumed:

- **Acceptance.** The first ``CALIBRATION_STEPS`` row-steps of a decode verify a large tree
  (``CALIBRATION_DEPTH`` levels, ``CALIBRATION_TOTAL`` draft tokens, and for ``hybrid`` a
  ``CALIBRATION_LOOKUP``-token lookup chain). For every smaller candidate (the n best-scored draft
  nodes up to depth d, the first m lookup tokens) the accepted length it would have had follows
  from that one verification: one plus the depth of its deepest node that the target's argmax
  accepts together with all its ancestors. That is exact at T = 0 (up to the few nodes a
  shallower tree would keep that the large one pruned); at T > 0 the same argmax test is the
  estimate. The table is kept per draft for the process, so later decodes (other batch sizes,
  other methods) plan without calibrating again.
- **Cost.** The target's forward of k tokens per row and the draft's, at this batch size
  (``forward_cost``), measured once per machine, target, draft architecture and batch size and
  cached under the data dir (``plans/``). A tree of depth d costs the target forward of its
  nodes plus d - 1 draft expansion forwards and one catch-up forward, plus the host-side work
  of a step (tree building, masks, acceptance, bookkeeping): each calibration step is timed
  whole, and the median of its wall time less its forwards is added to every speculative
  candidate.

The plan maximises predicted tokens per second over the grid. Unless the best speculative
candidate beats plain decoding (a one-token forward per token) by ``MARGIN``, the decode goes on
plainly: it proposes nothing and stops running the draft. The choice is recorded
(``Plan.as_dict``) with the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from scylla.decoding.expand import dynamic_shape
from scylla.decoding.forward_cost import forward_cost
from scylla.decoding.tree import Tree
from scylla.decoding.verify import greedy_accepted
from scylla.paths import data_dir

CALIBRATION_STEPS = 32  # row-steps: ~1-2% of a 40-prompt x 128-token bench at batch 1
CALIBRATION_DEPTH = 6
CALIBRATION_TOTAL = 24
CALIBRATION_LOOKUP = 8
# a plan must predict this much over plain decoding: the step's host-side work (tree building,
# masks, verification, bookkeeping) is not in the forward costs
MARGIN = 0.05
TOTALS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24)
LOOKUPS = (0, 1, 2, 3, 4, 6, 8)
COST_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 33)  # 33 = root + the calibration tree + its lookup


@dataclass
class Plan:
    mode: str  # "plain", "lookup" (no draft), "tree" or "hybrid"
    tree_total_tokens: int = 0
    tree_depth: int = 0
    lookup_len: int = 0
    tau: float = 1.0  # predicted accepted length
    speedup: float = 1.0  # predicted tokens/s over plain decoding's
    calibration_steps: int = 0

    @property
    def drafts(self) -> bool:
        return self.mode in ("tree", "hybrid")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Step:
    """One calibration row-step: the draft nodes (index < n_draft in the verified tree) and the
    lookup chain's nodes, with the target's argmax verdict on each."""

    scores: np.ndarray  # (n_draft - 1,) draft nodes 1..n_draft-1
    depths: np.ndarray
    accepted: np.ndarray  # bool
    chain: list[int] = field(default_factory=list)  # tree indices of the lookup chain
    chain_accepted: list[bool] = field(default_factory=list)
    n_draft: int = 0
    # the whole step's wall time and what the cost curve accounts for of it: the verified
    # nodes per row and the catch-up tokens (the rest is host-side work)
    wall_ms: float = 0.0
    verified: int = 0
    catch_up: int = 0
    batch: int = 1


def record(tree: Tree, n_draft: int, chains: list[list[int]], logits: torch.Tensor,
           wall_ms: float, catch_up: int) -> list[Step]:
    """The calibration steps of one verification: tree (B, N) as verified, n_draft the draft
    tree's node count before lookup grafting, chains[b] row b's lookup node indices, the
    step's wall time and its catch-up forward's tokens per row."""
    accepted = greedy_accepted(tree, logits.argmax(-1), tree.ancestors()).cpu().numpy()
    scores = tree.scores[:, 1:n_draft].float().cpu().numpy()
    depths = tree.depth[:, 1:n_draft].cpu().numpy()
    valid = tree.valid[:, 1:n_draft].cpu().numpy()
    steps = []
    for b in range(tree.tokens.shape[0]):
        ok = valid[b]
        steps.append(Step(scores=scores[b][ok], depths=depths[b][ok],
                          accepted=accepted[b, 1:n_draft][ok], chain=chains[b],
                          chain_accepted=[bool(accepted[b, i]) for i in chains[b]],
                          n_draft=n_draft, wall_ms=wall_ms, verified=tree.size,
                          catch_up=catch_up, batch=tree.tokens.shape[0]))
    return steps


def outcome(step: Step, total: int, depth: int, lookup: int) -> tuple[int, int]:
    """(accepted length, verified nodes) the step would have had with the ``total`` best draft
    nodes up to ``depth`` and the first ``lookup`` chain tokens."""
    index = np.arange(1, step.n_draft)[: len(step.scores)]
    shallow = step.depths <= depth
    order = np.argsort(-step.scores[shallow], kind="stable")[:total]
    kept = index[shallow][order]
    deepest = int(step.depths[shallow][order][step.accepted[shallow][order]].max(initial=0))
    chain, run = _lookup(step, lookup)
    kept_set = set(kept.tolist())
    shared = 0
    while shared < len(chain) and chain[shared] in kept_set:
        shared += 1
    return 1 + max(deepest, run), 1 + len(kept) + len(chain) - shared


class Costs:
    """ms of a target forward of k tokens per row and of a draft forward, at one batch size."""

    def __init__(self, rows: list[dict[str, float]]):
        self.ks = np.array([r["k"] for r in rows], dtype=float)
        self.target = np.array([r["target_ms"] for r in rows])
        self.draft = np.array([r.get("draft_ms", 0.0) for r in rows])

    def target_ms(self, k: float) -> float:
        return float(np.interp(k, self.ks, self.target))

    def draft_ms(self, k: float) -> float:
        return float(np.interp(k, self.ks, self.draft))


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor()} x{os.cpu_count()}"


def measured_costs(model: Any, draft: Any, batch: int) -> Costs:
    """The cost curve for this machine, target, draft architecture and batch size: cached as
    JSON under ``<data dir>/plans`` (measured in seconds on first use)."""
    shapes = [(n, list(t.shape)) for n, t in [*draft.named_parameters(), *draft.named_buffers()]]
    key = json.dumps([_machine(), torch.__version__, torch.get_num_threads(), str(model.device),
                      str(model.dtype), repr(model.config), type(draft).__name__, shapes, batch,
                      os.environ.get("SCYLLA_CPU_GEMM", "")])
    path = data_dir() / "plans" / f"costs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return Costs(json.loads(path.read_text())["rows"])
    rows = forward_cost(model, list(COST_KS), context=128, draft=draft, repeats=3,
                        roofline=False, batch=batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": rows}, indent=1))
    tmp.replace(path)
    return Costs(rows)


def host_ms(steps: list[Step], costs: Costs, width: int, batch: int) -> float:
    """The median host-side time of a calibration step: its wall time less the forwards the
    cost curve accounts for (steps at this batch size when there are any)."""
    mine = [s for s in steps if s.batch == batch] or steps
    rest = [s.wall_ms - costs.target_ms(s.verified) - (CALIBRATION_DEPTH - 1)
            * costs.draft_ms(width) - costs.draft_ms(s.catch_up) for s in mine]
    return max(0.0, float(np.median(rest))) if rest else 0.0


def choose(steps: list[Step], costs: Costs, width: int, lookup: bool, batch: int = 1) -> Plan:
    """The grid point with the highest predicted tokens/ms (see the module docstring); every
    speculative candidate pays the measured host-side time of a step (``host_ms``)."""
    plain_ms = costs.target_ms(1)
    host = host_ms(steps, costs, width, batch)
    best = Plan("plain", calibration_steps=len(steps))
    best_rate = 1.0 / plain_ms
    lookups = LOOKUPS if lookup else (0,)
    candidates = [(n, d, m) for n in TOTALS for d in range(1, CALIBRATION_DEPTH + 1)
                  for m in lookups if n <= width + (d - 1) * width * width]
    candidates += [(0, 0, m) for m in lookups if m > 0]
    for n, d, m in candidates:
        results = np.array([outcome(s, n, d, m) if n else _lookup_only(s, m) for s in steps])
        tau, size = results[:, 0].mean(), results[:, 1].mean()
        ms = costs.target_ms(size) + host
        if n:
            ms += (d - 1) * costs.draft_ms(width) + costs.draft_ms(tau)
        if tau / ms > best_rate * (1 + MARGIN if best.mode == "plain" else 1):
            mode = ("hybrid" if m else "tree") if n else "lookup"
            best = Plan(mode, n, d, m, float(tau), float(tau / ms * plain_ms), len(steps))
            best_rate = tau / ms
    return best


def _lookup(step: Step, lookup: int) -> tuple[list[int], int]:
    """The first ``lookup`` chain nodes and how many of them, from the first, are accepted."""
    chain = step.chain[:lookup]
    run = 0
    while run < len(chain) and step.chain_accepted[run]:
        run += 1
    return chain, run


def _lookup_only(step: Step, lookup: int) -> tuple[int, int]:
    chain, run = _lookup(step, lookup)
    return 1 + run, 1 + len(chain)


# calibration tables per draft model, for the process (weak: a dropped draft drops its table)
_TABLES: "weakref.WeakKeyDictionary[Any, dict[Any, list[Step]]]" = weakref.WeakKeyDictionary()


def known_steps(draft: Any, key: Any) -> list[Step]:
    return _TABLES.setdefault(draft, {}).setdefault(key, [])


class AutoPlanner:
    """Calibrates, then plans, within one decode (see the module docstring). The proposer it
    drives has ``drafter`` (a ``DraftProposer``), ``lookup_len`` and ``plan``."""

    def __init__(self, model: Any, draft: Any, width: int, lookup: bool, batch: int,
                 temperature: float):
        self.width, self.lookup, self.batch = width, lookup, batch
        self.steps = known_steps(draft, (width, lookup, temperature > 0))
        self.calibrating = len(self.steps) < CALIBRATION_STEPS
        # measured (or read from the cache) before the decode starts: a bench's untimed warm-up
        # pays for the measurement, not the timed run
        self.costs = measured_costs(model, draft, batch)

    def start(self, proposer: Any) -> Plan | None:
        """Give the proposer the calibration shape, or the plan when the table is known."""
        if not self.calibrating:
            return self.apply(proposer)
        proposer.drafter.set_shape(dynamic_shape(self.width, CALIBRATION_DEPTH,
                                                 CALIBRATION_TOTAL))
        proposer.lookup_len = CALIBRATION_LOOKUP if self.lookup else 0
        return None

    def record(self, proposer: Any, tree: Tree, n_draft: int, chains: list[list[int]],
               logits: torch.Tensor, wall_ms: float, catch_up: int) -> None:
        self.steps.extend(record(tree, n_draft, chains, logits, wall_ms, catch_up))
        if len(self.steps) >= CALIBRATION_STEPS:
            self.calibrating = False
            proposer.plan = self.apply(proposer)

    def apply(self, proposer: Any) -> Plan:
        plan = choose(self.steps, self.costs, self.width, self.lookup, self.batch)
        if plan.drafts:
            proposer.drafter.set_shape(dynamic_shape(self.width, plan.tree_depth,
                                                     plan.tree_total_tokens))
        proposer.lookup_len = plan.lookup_len
        return plan
