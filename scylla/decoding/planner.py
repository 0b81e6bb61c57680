"""The planner behind ``--tree auto``: the tree that pays most on this machine at this batch size.

A speculative step's speed is E[accepted length] / E[step cost] (EAGLE-2, Sequoia); both are
measured here, never assumed:

- **Acceptance.** The first ``CALIBRATION_STEPS`` row-steps of a decode verify a large tree
  (``CALIBRATION_DEPTH`` levels, ``CALIBRATION_TOTAL`` draft tokens, and for ``hybrid`` a
  ``CALIBRATION_LOOKUP``-token lookup chain). For every smaller candidate (the n best-scored draft
  nodes up to depth d, the first m lookup tokens, proposed only after a context match of at
  least g tokens) the accepted length it would have had follows from that one verification:
  one plus the depth of its deepest node that the target's argmax accepts together with all its
  ancestors. That is exact at T = 0 (up to the few nodes a shallower tree would keep that the
  large one pruned); at T > 0 the same argmax test is the estimate.
- **Re-planning.** What pays moves with the text: prompt lookup accepts 2.5 tokens a step on
  extraction and translation and 1.15 on writing. So while the plan drafts, one verification in
  ``REPLAN_EVERY`` verifies the calibration tree again, and the plan is chosen anew from the
  latest ``WINDOW`` row-steps. The table is kept per draft, for the process and on disk
  (``plans_dir()``, keyed by the draft's weights), so later decodes (other batch sizes, other
  methods, other processes on this machine) start from it without calibrating again: a short
  decode no longer pays for a calibration it is too short to earn back. A plan that does
  not draft, chosen on a full window (the first plan is: ``CALIBRATION_STEPS`` = ``WINDOW``),
  is final for its decode (``settled``): the draft stops, and a plain plan's steps are plain
  decoding's (``Decoder.plain_step``). A settled lookup plan's chains are cut step by step by
  the proposer's ``LookupGate``, down to the root alone where lookups do not pay.
- **Cost.** The target's forward of k tokens per row and the draft's, at this batch size
  (``forward_cost``), measured per machine, target, draft architecture and batch size and
  cached in ``plans_dir()`` for ``COSTS_MAX_AGE_S``. Rows verified together pay
  one forward of the largest row's tree: the table's own verifications when it was recorded
  at this batch size, else the expected largest of ``batch`` row-steps drawn from it. A tree
  of depth d costs the target forward of its nodes plus d - 1 draft expansion forwards and one
  catch-up forward. What the curve misses
  (host-side work: tree building, masks, acceptance, bookkeeping; forwards slower inside a
  decode than in the curve's tight loop) is measured too: every step of a speculative plan is
  timed whole, and the median of its wall time over the forwards the curve predicts for it,
  over the latest ``WINDOW`` such steps, scales every speculative candidate's cost. Until
  ``OBSERVED_MIN`` steps are timed, the calibration steps' own ratio stands in. (A ratio, not
  an added constant: on the 2-core EPYC a calibration step of 25-33 tokens took 10-30 ms more
  than its forwards, a 2-5 token lookup step far less.) A plan is chosen again as soon as
  ``OBSERVED_MIN`` of its steps are timed, and the ratios are kept with the cost curve (until it
  is measured again), so the next decode at this batch size starts from them: at batch 4 a
  tree the curve favoured ran slower than plain decoding for up to ``REPLAN_EVERY``
  verifications of every decode before its own step times turned it to plain decoding.

The plan maximises predicted tokens per second over the grid. Unless the best speculative
candidate beats plain decoding (a one-token forward per token) by ``MARGIN``, the decode goes on
plainly: it proposes nothing and stops running the draft. The choice is recorded
(``Plan.as_dict``) with the run.

A lookup plan that no longer drafts (settled) is not chosen again: the table it was chosen on
can come from another text, and what pays moves with the text. Each step the ``LookupGate``
cuts every row's chain to the length with the most expected tokens per ms, from what this
decode's chains of the same match length went on to match and from what its steps of each kind
(the root alone, or not) took over the curve's forwards (``lookup_step_ms``). Where lookups do
not pay, a step verifies the root alone, at a plain step's cost; when they pay again, the
chains come back. (It replaced a guard that handed the decode to plain decoding for good when a
window of lookup steps ran below plain probes: on the 40-prompt Spec-Bench bench that gave up
the lookups of the last 16 prompts, 1.00x plain where prompt lookup ran 1.20x.)
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from scylla.decoding.expand import dynamic_shape
from scylla.decoding.forward_cost import forward_cost
from scylla.decoding.tree import Tree
from scylla.decoding.verify import greedy_accepted
from scylla.modeling import kernels
from scylla.paths import plans_dir

# row-steps: ~1.4% of a 40-prompt x 128-token bench at batch 1, and a full WINDOW, so a first
# plan that does not draft is final at once (at batch 1 a window filled by re-planning alone
# took ~1,000 steps of catch-up and calibration, 15% slower than plain decoding)
CALIBRATION_STEPS = 64
CALIBRATION_DEPTH = 6
CALIBRATION_TOTAL = 24
CALIBRATION_LOOKUP = 8
# once planned, one verification in REPLAN_EVERY calibrates again (until a plan that does not
# draft is settled) and the plan is re-chosen from the latest WINDOW row-steps. Chosen
# on the calibration trees of a whole 40-prompt Spec-Bench decode (batch 1, shipped draft):
# predicted 1.40x plain for 32 / 64, 1.38x for 16 / 64, 1.32x for 8 / 48, 1.40x for 32 / 256,
# 1.12x planning once on the first 32 row-steps, 1.48x for the best fixed plan in hindsight
REPLAN_EVERY = 32
WINDOW = 64
# a plan must predict this much over plain decoding: the slowdown is a median, and plain
# decoding's own step is not measured (its forward's cost is the curve's)
MARGIN = 0.05
TOTALS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24)  # 0: lookup alone
LOOKUPS = (0, 1, 2, 3, 4, 6, 8)
COST_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 33)  # 33 = root + the calibration tree + its lookup
# a shared machine's cost curve drifts within hours (seen on the 2-core EPYC: the k = 8 forward
# cost 1.30x the k = 1 forward at one hour and 1.51x two hours later), so it is measured again
COSTS_MAX_AGE_S = 3600
OBSERVED_MIN = 8  # timed steps of speculative plans before their ratio replaces calibration's


@dataclass
class Plan:
    mode: str  # "plain", "lookup" (no draft), "tree" or "hybrid"
    tree_total_tokens: int = 0
    tree_depth: int = 0
    lookup_len: int = 0
    # lookup proposes only after a match of at least this many context tokens (an n-gram)
    lookup_min_match: int = 1
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
    match: int = 1  # the n-gram length the lookup chain matched (0: no chain)
    # the whole step's wall time and what the cost curve accounts for of it: the verified
    # nodes per row and the catch-up tokens (the rest is host-side work)
    wall_ms: float = 0.0
    verified: int = 0
    catch_up: int = 0
    batch: int = 1
    group: int = 0  # the verification it was part of: its rows share one forward

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return _step_arrays(self)


_GROUPS = itertools.count()


def record(tree: Tree, n_draft: int, chains: list[list[int]], matches: list[int],
           logits: torch.Tensor, wall_ms: float, catch_up: int) -> list[Step]:
    """The calibration steps of one verification: tree (B, N) as verified, n_draft the draft
    tree's node count before lookup grafting, chains[b] row b's lookup node indices and
    matches[b] the n-gram length it matched, the step's wall time and its catch-up forward's
    tokens per row."""
    accepted = greedy_accepted(tree, logits.argmax(-1), tree.ancestors()).cpu().numpy()
    scores = tree.scores[:, 1:n_draft].float().cpu().numpy()
    depths = tree.depth[:, 1:n_draft].cpu().numpy()
    valid = tree.valid[:, 1:n_draft].cpu().numpy()
    group = next(_GROUPS)
    steps = []
    for b in range(tree.tokens.shape[0]):
        ok = valid[b]
        steps.append(Step(scores=scores[b][ok], depths=depths[b][ok],
                          accepted=accepted[b, 1:n_draft][ok], chain=chains[b],
                          chain_accepted=[bool(accepted[b, i]) for i in chains[b]],
                          n_draft=n_draft, match=matches[b], wall_ms=wall_ms,
                          verified=tree.size, catch_up=catch_up, batch=tree.tokens.shape[0],
                          group=group))
    return steps


class Outcomes:
    """Every grid point's accepted length and verified nodes, for every step at once: arrays
    indexed [step, depth - 1, total (TOTALS), lookup (LOOKUPS), min match - 1]."""

    def __init__(self, steps: list[Step], max_match: int):
        deepest, kept, shared, run, length = (np.stack(a) for a in zip(
            *(s.arrays for s in steps)))
        use = (np.array([s.match for s in steps])[:, None]
               >= np.arange(1, max_match + 1)[None])  # (S, G)
        run_g = np.where(use[:, None], run[..., None], 0)  # (S, M, G)
        length_g = np.where(use[:, None], length[..., None], 0)
        self.tau = 1 + np.maximum(deepest[..., None, None], run_g[:, None, None])
        self.size = 1 + kept[..., None, None] + length_g[:, None, None] - np.minimum(
            shared[..., None, None], length_g[:, None, None])


def _step_arrays(s: Step) -> tuple[np.ndarray, ...]:
    """One step's part of ``Outcomes``: per depth and total, the deepest accepted draft node,
    the draft nodes kept and the lookup chain's leading nodes among them; per lookup length,
    the chain's accepted run and its length."""
    totals = np.array(TOTALS)
    deepest = np.zeros((CALIBRATION_DEPTH, len(TOTALS)), dtype=int)
    kept, shared = np.zeros_like(deepest), np.zeros_like(deepest)
    index = np.arange(1, s.n_draft)[: len(s.scores)]
    for d in range(1, CALIBRATION_DEPTH + 1):
        shallow = np.flatnonzero(s.depths <= d)
        order = shallow[np.argsort(-s.scores[shallow], kind="stable")]
        upto = np.minimum(totals, len(order))
        hit = np.maximum.accumulate(np.where(s.accepted[order], s.depths[order], 0))
        deepest[d - 1] = np.concatenate([[0], hit])[upto]
        kept[d - 1] = upto
        rank = dict(zip(index[order].tolist(), range(len(order))))
        # the chain's first j nodes are all kept once the total exceeds their highest rank
        worst = np.maximum.accumulate([rank.get(c, np.iinfo(int).max) for c in s.chain]
                                      or [0])[:len(s.chain)]
        shared[d - 1] = np.searchsorted(worst, totals, side="left")
    accepted = np.cumprod(s.chain_accepted) if s.chain else np.zeros(0, dtype=int)
    run = np.array([int(accepted[:m].sum()) for m in LOOKUPS])
    length = np.minimum(np.array(LOOKUPS), len(s.chain))
    return deepest, kept, shared, run, length


def outcome(step: Step, total: int, depth: int, lookup: int, min_match: int = 1
            ) -> tuple[int, int]:
    """(accepted length, verified nodes) the step would have had with the ``total`` best draft
    nodes up to ``depth`` and the first ``lookup`` chain tokens (after a match of at least
    ``min_match`` tokens)."""
    table = Outcomes([step], max(min_match, 1))
    at = (0, depth - 1, TOTALS.index(total), LOOKUPS.index(lookup), min_match - 1)
    return int(table.tau[at]), int(table.size[at])


class Costs:
    """ms of a target forward of k tokens per row and of a draft forward, at one batch size."""

    def __init__(self, rows: list[dict[str, float]], ratios: list[float] | None = None,
                 record: dict[str, Any] | None = None, path: Any = None):
        """ratios: speculative steps' wall time over the curve's forwards, as measured by
        earlier decodes at this batch size; record, path: the cached curve's file (None: not
        cached)."""
        self.ks = np.array([r["k"] for r in rows], dtype=float)
        self.target = np.array([r["target_ms"] for r in rows])
        self.draft = np.array([r.get("draft_ms", 0.0) for r in rows])
        self.ratios = list(ratios or [])
        self.record, self.path = record, path

    def keep_ratios(self, ratios: list[float]) -> None:
        """Store ``ratios`` with the cached curve for later decodes at this batch size."""
        self.ratios = list(ratios)
        if self.path is not None:
            _write_json(self.path, {**self.record, "ratios": self.ratios})

    def target_ms(self, k: float) -> float:
        return float(np.interp(k, self.ks, self.target))

    def draft_ms(self, k: float) -> float:
        return float(np.interp(k, self.ks, self.draft))


def measured_costs(model: Any, draft: Any, batch: int) -> Costs:
    """The cost curve for this machine, target, draft architecture and batch size: cached as
    JSON in ``plans_dir()`` (measured in seconds on first use, and again once the cached curve
    is ``COSTS_MAX_AGE_S`` old), with the step-time ratios decodes kept with it."""
    shapes = [(n, list(t.shape)) for n, t in [*draft.named_parameters(), *draft.named_buffers()]]
    key = json.dumps([kernels.cpu_model(), os.cpu_count(), torch.__version__,
                      torch.get_num_threads(), str(model.device), str(model.dtype),
                      repr(model.config), type(draft).__name__, shapes, batch,
                      kernels.fingerprint()])
    path = plans_dir() / f"costs-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if time.time() - record["measured"] < COSTS_MAX_AGE_S:
                return Costs(record["rows"], record.get("ratios"), record, path)
        except (ValueError, KeyError, TypeError):
            pass  # a file of another version of this code: measure again
    rows = forward_cost(model, list(COST_KS), context=128, draft=draft, repeats=3,
                        roofline=False, batch=batch)
    record = {"key": key, "rows": rows, "measured": time.time()}
    _write_json(path, record)
    return Costs(rows, None, record, path)


def _write_json(path: Any, content: Any) -> None:
    """Write whole or not at all (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


def forwards_ms(costs: Costs, verified: int, depth: int, width: int, catch_up: int) -> float:
    """The forwards the cost curve predicts for one step: the target's of ``verified`` nodes per
    row, ``depth - 1`` draft expansions of ``width`` tokens and a catch-up of ``catch_up``
    tokens (0: none)."""
    return (costs.target_ms(verified) + max(depth - 1, 0) * costs.draft_ms(width)
            + (costs.draft_ms(catch_up) if catch_up else 0.0))


def slowdown(steps: list[Step], costs: Costs, width: int, batch: int) -> float:
    """The median ratio of a calibration step's wall time to the forwards the cost curve
    predicts for it (steps at this batch size when there are any; at least 1)."""
    mine = [s for s in steps if s.batch == batch and s.wall_ms > 0] or [
        s for s in steps if s.wall_ms > 0]
    ratio = [s.wall_ms / forwards_ms(costs, s.verified, CALIBRATION_DEPTH, width, s.catch_up)
             for s in mine]
    return max(1.0, float(np.median(ratio))) if ratio else 1.0


def choose(steps: list[Step], costs: Costs, width: int, max_match: int = 0, batch: int = 1,
           slower: float | None = None) -> Plan:
    """The grid point with the highest predicted tokens/ms (see the module docstring); every
    speculative candidate's forwards cost ``slower`` times the curve's (None: the calibration
    steps' measure, ``slowdown``). max_match: the lookup's longest n-gram (0: no lookup)."""
    plain_ms = costs.target_ms(1)
    if slower is None:
        slower = slowdown(steps, costs, width, batch)
    table = Outcomes(steps, max(max_match, 1))
    # a verification costs the forward of its largest row's tree (and the catch-up of its
    # longest accepted run), and yields every row's tokens
    target = np.interp(table.size, costs.ks, costs.target)
    catch_up = np.interp(table.tau, costs.ks, costs.draft)
    if all(s.batch == batch for s in steps):  # the rows that were verified together
        groups = np.array([s.group for s in steps])
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])  # steps come in groups
        target = np.maximum.reduceat(target, starts, axis=0).sum(0)
        catch_up = np.maximum.reduceat(catch_up, starts, axis=0).sum(0)
        verifications = len(starts)
    else:
        # recorded at another batch size (one table serves them all): ``batch`` row-steps
        # drawn at random share a verification, which costs the expected largest of them
        # (their order statistics); the table's own groups would put a batch-1 table's rows
        # each in a forward of its own and price a lookup at batch 8 as cheap as at batch 1
        count = len(steps)
        cdf = (np.arange(count + 1) / count) ** batch
        weight = np.diff(cdf)[:, None, None, None, None]  # P(the j-th smallest is the largest)
        verifications = count / batch
        target = (weight * np.sort(target, axis=0)).sum(0) * verifications
        catch_up = (weight * np.sort(catch_up, axis=0)).sum(0) * verifications
    tokens = table.tau.sum(0)
    totals = np.array(TOTALS)[None, :, None, None]
    depth = np.arange(1, CALIBRATION_DEPTH + 1)[:, None, None, None]
    draft = (depth - 1) * costs.draft_ms(width) * verifications + catch_up
    ms = (target + np.where(totals > 0, draft, 0.0)) * slower
    rate = tokens / ms  # [depth, total, lookup, min match]
    lookups = np.array(LOOKUPS)[None, None, :, None]
    matches = np.arange(1, max(max_match, 1) + 1)[None, None, None, :]
    fits = ((totals <= width + (depth - 1) * width * width) & ((lookups == 0) | (max_match > 0))
            # one grid point per plan: lookup alone has no depth, no lookup no minimum match
            & ((totals > 0) | (depth == 1)) & ((lookups > 0) | (matches == 1))
            & ((totals > 0) | (lookups > 0)))
    rate = np.where(fits, rate, -np.inf)
    plain_rate = len(steps) / (verifications * plain_ms)
    best = np.unravel_index(np.argmax(rate), rate.shape)
    if rate[best] <= plain_rate * (1 + MARGIN):
        return Plan("plain", calibration_steps=len(steps))
    d, n, m, g = int(best[0]) + 1, TOTALS[best[1]], LOOKUPS[best[2]], int(best[3]) + 1
    mode = ("hybrid" if m else "tree") if n else "lookup"
    return Plan(mode, n, d if n else 0, m, g if m else 1,
                float(table.tau[:, best[0], best[1], best[2], best[3]].mean()),
                float(rate[best] / plain_rate), len(steps))


# calibration tables per draft model, for the process (weak: a dropped draft drops its table)
_TABLES: "weakref.WeakKeyDictionary[Any, dict[Any, list[Step]]]" = weakref.WeakKeyDictionary()
_DIGESTS: "weakref.WeakKeyDictionary[Any, tuple[Any, str]]" = weakref.WeakKeyDictionary()
_SAVED = ("scores", "depths", "accepted", "chain", "chain_accepted", "n_draft", "match",
          "wall_ms", "verified", "catch_up", "batch", "group")


def draft_digest(draft: Any) -> str:
    """sha256 of the draft's weights and buffers (recomputed after an in-place update)."""
    state = draft.state_dict()
    versions = tuple(-1 if t.is_inference() else t._version for t in state.values())
    hit = _DIGESTS.get(draft)
    if hit is None or hit[0] != versions:
        h = hashlib.sha256()
        for name, t in sorted(state.items()):
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        hit = (versions, h.hexdigest())
        _DIGESTS[draft] = hit
    return hit[1]


def table_path(draft: Any, key: Any) -> Any:
    """Where the draft's calibration table for ``key`` lives between processes; the
    calibration tree's size is part of the name, since the table's steps are verifications of
    that tree."""
    name = json.dumps([draft_digest(draft), key, CALIBRATION_DEPTH, CALIBRATION_TOTAL,
                       CALIBRATION_LOOKUP])
    return plans_dir() / f"steps-{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def known_steps(draft: Any, key: Any, path: Any) -> list[Step]:
    """The draft's calibration table for ``key``: this process's, else the one saved on this
    machine at ``path`` (``table_path``, ``save_steps``), else empty."""
    tables = _TABLES.setdefault(draft, {})
    if key not in tables:
        tables[key] = load_steps(path)
    return tables[key]


def load_steps(path: Any) -> list[Step]:
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
        steps = [Step(**{k: (np.array(r[k]) if k in ("scores", "depths", "accepted") else r[k])
                         for k in _SAVED}) for r in rows]
    except (ValueError, KeyError, TypeError):
        return []  # a table from another version of this code: calibrate again
    # group numbers are per process: the saved ones become negative, so they never merge with
    # this process's verifications
    first = {g: -1 - i for i, g in enumerate(dict.fromkeys(s.group for s in steps))}
    for s in steps:
        s.group = first[s.group]
    return steps


def save_steps(path: Any, steps: list[Step]) -> None:
    _write_json(path, [{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                        for k, v in ((k, getattr(s, k)) for k in _SAVED)} for s in steps])


class AutoPlanner:
    """Calibrates, plans, and re-plans within one decode (see the module docstring). The
    proposer it drives has ``drafter`` (a ``DraftProposer``), ``lookup_len``,
    ``lookup_min_match`` and ``plan``."""

    def __init__(self, model: Any, draft: Any, width: int, ngram: int, batch: int,
                 temperature: float):
        """ngram: the lookup's longest n-gram (0: no lookup, the ``tree`` method)."""
        self.width, self.ngram, self.batch = width, ngram, batch
        key = (width, ngram, temperature > 0)
        self.table = table_path(draft, key)
        self.steps = known_steps(draft, key, self.table)
        self.calibrating = False  # this step verifies the calibration tree
        self.since = 0  # verifications since the last calibration step
        self.plans = 0  # plans chosen in this decode
        self.calibrated = 0  # row-steps this decode verified the calibration tree for
        self.shape = dynamic_shape(width, CALIBRATION_DEPTH, CALIBRATION_TOTAL)
        # measured (or read from the cache) before the decode starts: a bench's untimed warm-up
        # pays for the measurement, not the timed run
        self.costs = measured_costs(model, draft, batch)
        # speculative steps' wall time over their forwards': earlier decodes' at this batch
        # size, then this decode's (``timed`` of them)
        self.ratios: list[float] = self.costs.ratios[-WINDOW:]
        self.timed = 0
        # lookup plans' steps, root alone (False) or not: wall time over the curve's forward,
        # and their median once OBSERVED_MIN are timed (1 before)
        self.step_ratios: dict[bool, list[float]] = {False: [], True: []}
        self.step_slower: dict[bool, float] = {False: 1.0, True: 1.0}

    @property
    def lookup_room(self) -> int:
        return CALIBRATION_LOOKUP if self.ngram else 0

    def start(self, proposer: Any) -> Plan | None:
        """The plan when the table is known already (None: calibrate first)."""
        return self.apply(proposer) if len(self.steps) >= CALIBRATION_STEPS else None

    def settled(self, plan: Plan | None) -> bool:
        """A plan that does not draft, chosen on a full window: final for the decode."""
        return plan is not None and not plan.drafts and len(self.steps) >= WINDOW

    def begin(self, proposer: Any) -> None:
        """Before a step's proposal: give the proposer the calibration shape when this step
        calibrates (no plan yet, or an unsettled plan due for re-planning)."""
        plan = proposer.plan
        self.calibrating = plan is None or (not self.settled(plan)
                                            and self.since >= REPLAN_EVERY - 1)
        if not self.calibrating:
            self.since += 1
            return
        proposer.drafter.set_shape(self.shape)
        proposer.lookup_len, proposer.lookup_min_match = self.lookup_room, 1

    def record(self, proposer: Any, tree: Tree, n_draft: int, chains: list[list[int]],
               matches: list[int], logits: torch.Tensor, wall_ms: float, catch_up: int
               ) -> None:
        new = record(tree, n_draft, chains, matches, logits, wall_ms, catch_up)
        self.calibrated += len(new)
        self.steps.extend(new)
        del self.steps[:-WINDOW]
        self.calibrating, self.since = False, 0
        if len(self.steps) >= CALIBRATION_STEPS:
            save_steps(self.table, self.steps)
            proposer.plan = self.apply(proposer)

    def observe(self, plan: Plan, wall_ms: float, verified: int, catch_up: int) -> None:
        """A step of ``plan`` (not a calibration step) took ``wall_ms``: it verified
        ``verified`` nodes per row and its catch-up fed ``catch_up`` tokens per row (0: none)."""
        if plan.mode == "plain":
            return  # the ratio scales what speculative candidates cost
        if plan.mode == "lookup":
            ratios = self.step_ratios[verified > 1]
            ratios.append(wall_ms / self.costs.target_ms(verified))
            del ratios[:-WINDOW]
            if len(ratios) >= OBSERVED_MIN:
                self.step_slower[verified > 1] = float(np.median(ratios))
            if verified == 1:
                return  # the gate's root-only step: not what a lookup candidate costs
        depth = plan.tree_depth if plan.drafts else 0
        self.ratios.append(wall_ms / forwards_ms(self.costs, verified, depth, self.width,
                                                 catch_up))
        del self.ratios[:-WINDOW]
        self.timed += 1

    def review(self, proposer: Any) -> None:
        """A drafting plan is chosen again at its own measured slowdown once ``OBSERVED_MIN``
        of this decode's steps are timed (its calibrations re-plan it after that). A settled
        plan is not: a plain plan is final, and a lookup plan's gate decides each step."""
        plan = proposer.plan
        if (plan is None or self.settled(plan) or self.timed != OBSERVED_MIN
                or self.slowdown() is None):
            return
        proposer.plan = self.apply(proposer)

    def lookup_step_ms(self, k: int) -> float:
        """What a lookup plan's step verifying k lookup tokens per row costs: the curve's
        forward of 1 + k tokens times the median ratio of this decode's timed steps of its kind
        (the root alone, or not) to their forwards (1 until ``OBSERVED_MIN`` are timed)."""
        return self.costs.target_ms(1 + k) * self.step_slower[k > 0]

    def slowdown(self) -> float | None:
        """How much slower than the cost curve this decode's speculative steps ran (their
        median ratio, at least 1; None: too few timed)."""
        if len(self.ratios) < OBSERVED_MIN:
            return None
        return max(1.0, float(np.median(self.ratios)))

    def apply(self, proposer: Any) -> Plan:
        plan = choose(self.steps, self.costs, self.width, self.ngram, self.batch,
                      self.slowdown())
        self.plans += 1
        if self.timed:
            self.costs.keep_ratios(self.ratios)
        if plan.drafts:
            proposer.drafter.set_shape(dynamic_shape(self.width, plan.tree_depth,
                                                     plan.tree_total_tokens))
        proposer.lookup_len, proposer.lookup_min_match = plan.lookup_len, plan.lookup_min_match
        return plan
