"""What every decoding method returns: the tokens and the raw counts metrics derive from.

Raw counts only; τ, α and speeds are derived from sums (never averages of per-step ratios).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RowStats:
    """Counts for one prompt (one batch row)."""

    new_tokens: int = 0
    # target forwards that emitted tokens for this row, prefill included (it emits the first
    # token), so plain decoding has exactly τ = new_tokens / target_forwards = 1
    target_forwards: int = 0
    draft_forwards: int = 0
    # accepted_lengths[s]: tokens emitted by target forward s, the bonus token included
    accepted_lengths: list[int] = field(default_factory=list)
    proposed: int = 0  # draft tokens proposed along verified chains (chain drafting)
    accepted: int = 0  # of those, accepted
    proposed_at: list[int] = field(default_factory=list)  # per draft position i
    accepted_at: list[int] = field(default_factory=list)
    # wall-clock share of this row: each forward's time split evenly over the rows it served
    # (so per-category tokens/s = category tokens / category seconds); 0 where not measured
    seconds: float = 0.0

    def add_position(self, i: int, accepted: bool) -> None:
        while len(self.proposed_at) <= i:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        self.proposed_at[i] += 1
        self.accepted_at[i] += int(accepted)


@dataclass
class DecodeResult:
    """Output of one decoding call over a list of prompts (in the prompts' order)."""

    tokens: list[list[int]]  # new tokens per prompt; ends with EOS when EOS was produced
    stats: list[RowStats]
    # wall-clock seconds: "draft", "verify", "other" and "total" (device-synchronised)
    seconds: dict[str, float] = field(default_factory=dict)
    # the planner's choice (``--tree auto``, ``scylla.decoding.planner.Plan.as_dict``)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(s.new_tokens for s in self.stats)

    @property
    def target_forwards(self) -> int:
        return sum(s.target_forwards for s in self.stats)

    @property
    def tau(self) -> float:
        """Mean accepted length: new tokens / target verification forwards (bonus included)."""
        return self.new_tokens / max(1, self.target_forwards)

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the call's total wall-clock seconds."""
        return self.new_tokens / self.seconds["total"]
