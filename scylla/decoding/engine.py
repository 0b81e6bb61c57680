"""The speculative decoding loop shared by every drafting method.

One step for a batch of rows: the proposer drafts a tree per row (all rows padded to the same
node count), the target verifies every node in one forward with the tree attention mask at
positions L + depth, ``verify`` picks each row's accepted path, the target cache keeps exactly
that path, and the proposer catches up. Each row accepts its own number of tokens; a row's
tokens depend only on its own prompt (rows never see each other: masks, caches and positions
are per row).

Continuous batching: up to ``decode_batch_size`` rows decode together; when a row finishes
(EOS or ``max_new_tokens``) the next waiting prompt is prefilled and put in its slot, and when
no prompt is left the finished rows are dropped from the batch.

Timing: "verify" is the target's work (prefills, verification forwards, acceptance and the cache
update), "draft" the proposer's (tree growth, the draft's prefill and catch-up), "other" the
rest (host-side bookkeeping).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from scylla.decoding import sampling
from scylla.decoding.prefill import Prefill, check_prompts, prefill
from scylla.decoding.result import DecodeResult, RowStats
from scylla.decoding.rows import put_cache_rows
from scylla.decoding.timing import Stopwatch
from scylla.decoding.tree import Candidates, Tree
from scylla.decoding.verify import Verdict, verify_greedy, verify_sampled


class ProposerState(Protocol):
    def propose(self, roots: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None) -> tuple[Tree, Candidates | None]: ...

    def commit(self, verdict: Verdict, target_out: Any, lengths: torch.Tensor,
               emitted: list[list[int]]) -> None: ...

    def select(self, rows: torch.Tensor) -> "ProposerState": ...

    def put(self, rows: torch.Tensor, other: "ProposerState") -> None: ...


class Proposer(Protocol):
    hidden_layers: tuple[int, ...]  # target hidden states the proposer reads
    room: int  # cache entries one step needs beyond the context
    forwards_per_step: int  # draft forwards per step
    prefill_forwards: int  # draft forwards of the prefill
    # settled on proposing nothing for the rest of the decode: steps are plain decoding's
    plain: bool

    def start(self, pre: Prefill) -> ProposerState: ...


@dataclass
class Row:
    prompt: int  # index into the prompts
    tokens: list[int] = field(default_factory=list)
    stats: RowStats = field(default_factory=RowStats)
    done: bool = False


class Batch:
    """The rows decoding together: target cache, roots (last emitted tokens), proposer state."""

    def __init__(self, cache: Any, roots: torch.Tensor, rows: list[Row], state: ProposerState):
        self.cache, self.roots, self.rows, self.state = cache, roots, rows, state

    def select(self, keep: list[int]) -> "Batch":
        idx = torch.tensor(keep, device=self.roots.device)
        return Batch(self.cache.select(idx), self.roots[idx], [self.rows[i] for i in keep],
                     self.state.select(idx))

    def put(self, slots: list[int], other: "Batch") -> None:
        idx = torch.tensor(slots, device=self.roots.device)
        put_cache_rows(self.cache, idx, other.cache)
        self.roots[idx] = other.roots
        for s, row in zip(slots, other.rows):
            self.rows[s] = row
        self.state.put(idx, other.state)


class Decoder:
    """Decodes every prompt with one proposer; ``run()`` returns the tokens in prompt order."""

    def __init__(self, model: Any, prompts: list[list[int]], proposer: Proposer,
                 max_new_tokens: int, decode_batch_size: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 on_emit: Callable[[int, list[int]], None] | None = None,
                 eos_token_ids: list[int] | None = None,
                 generator: torch.Generator | None = None):
        """on_emit(prompt index, new tokens) is called as tokens are emitted (streaming).
        EOS tokens are the model's unless ``eos_token_ids`` is given; sampling draws from
        ``generator`` when given, else from a new one seeded with ``seed``."""
        check_prompts(prompts, max_new_tokens, model.config.max_position_embeddings)
        self.model, self.prompts, self.proposer = model, prompts, proposer
        self.max_new, self.batch_size = max_new_tokens, decode_batch_size
        self.temperature, self.top_p = temperature, top_p
        self.eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.generator = (generator if generator is not None
                          else torch.Generator(device=model.device).manual_seed(seed))
        self.max_len = max(len(p) for p in prompts) + max_new_tokens + proposer.room
        self.results: dict[int, Row] = {}
        self.waiting = list(range(len(prompts)))
        self.clock = Stopwatch(model.device)
        self.on_emit = on_emit

    def run(self) -> DecodeResult:
        batch = self.settle(self.admit(self.take(self.batch_size)))
        while batch is not None:
            self.step(batch)
            batch = self.settle(batch)
        rows = [self.results[i] for i in range(len(self.prompts))]
        return DecodeResult([r.tokens for r in rows], [r.stats for r in rows],
                            self.clock.seconds())

    def take(self, n: int) -> list[int]:
        taken, self.waiting = self.waiting[:n], self.waiting[n:]
        return taken

    def admit(self, prompt_ids: list[int], refill: bool = False) -> Batch:
        """Prefill these prompts (target, then proposer) as a batch of their own; a refill's
        caches hold just the prompts (``Batch.put`` copies them into the running batch's, and
        a full-length cache per refill cost ~70 ms of zeroing on the 2-core CPU)."""
        prompts = [self.prompts[i] for i in prompt_ids]
        capacity = max(len(p) for p in prompts) if refill else self.max_len
        start = time.perf_counter()
        with self.clock("verify"):
            pre = prefill(self.model, prompts, capacity, self.proposer.hidden_layers,
                          self.temperature, self.top_p, self.generator)
        with self.clock("draft"):
            state = self.proposer.start(pre)
        rows = [Row(i) for i in prompt_ids]
        share = (time.perf_counter() - start) / len(rows)
        for row, tok in zip(rows, pre.first.tolist()):
            self.emit(row, [tok], draft_forwards=self.proposer.prefill_forwards)
            row.stats.seconds += share
        return Batch(pre.cache, pre.first.clone(), rows, state)

    def emit(self, row: Row, tokens: list[int], draft_forwards: int) -> None:
        """Append a target forward's tokens to a row, cut at EOS / max_new_tokens."""
        room = self.max_new - len(row.tokens)
        kept = []
        for t in tokens[:room]:
            kept.append(t)
            if t in self.eos:
                break
        row.tokens += kept
        if self.on_emit is not None:
            self.on_emit(row.prompt, kept)
        s = row.stats
        s.new_tokens += len(kept)
        s.target_forwards += 1
        s.draft_forwards += draft_forwards
        s.accepted_lengths.append(len(kept))
        row.done = len(row.tokens) >= self.max_new or kept[-1] in self.eos

    def settle(self, batch: Batch) -> Batch | None:
        """Retire finished rows: refill their slots with waiting prompts, or drop them."""
        while True:
            done = [i for i, r in enumerate(batch.rows) if r.done]
            if not done:
                return batch
            for i in done:
                self.results[batch.rows[i].prompt] = batch.rows[i]
            fresh = self.take(len(done))
            if fresh:
                batch.put(done[:len(fresh)], self.admit(fresh, refill=True))
            if len(fresh) < len(done):
                gone = set(done[len(fresh):])
                keep = [i for i in range(len(batch.rows)) if i not in gone]
                if not keep:
                    return None
                batch = batch.select(keep)

    def step(self, batch: Batch) -> None:
        start = time.perf_counter()
        if self.proposer.plain:
            self.plain_step(batch)
        else:
            self.speculative_step(batch)
        share = (time.perf_counter() - start) / len(batch.rows)
        for row in batch.rows:
            row.stats.seconds += share

    def plain_step(self, batch: Batch) -> None:
        """Plain decoding's step (its forward, no mask, and its sampling): no tree, no
        verification, no proposer."""
        with self.clock("verify"):
            logits = self.model(batch.roots[:, None], cache=batch.cache).logits[:, -1]
            nxt = sampling.sample(logits, self.temperature, self.top_p, self.generator)
        for row, tok in zip(batch.rows, nxt.tolist()):
            self.emit(row, [tok], draft_forwards=0)
        batch.roots = nxt

    def speculative_step(self, batch: Batch) -> None:
        lengths = batch.cache.lengths.clone()  # (B,) L: the root sits at position L
        with self.clock("draft"):
            tree, cands = batch.state.propose(batch.roots, lengths, self.generator)
        with self.clock("verify"):
            mask = tree.ancestors()  # (B, N, N)
            out = self.model(tree.tokens, cache=batch.cache,
                             position_ids=lengths[:, None] + tree.depth,
                             tree_mask=mask if tree.size > 1 else None,  # the root: causal
                             hidden_layers=self.proposer.hidden_layers)
            if self.temperature == 0:
                verdict = verify_greedy(tree, out.logits, mask)
            else:
                q = sampling.probs(out.logits, self.temperature, self.top_p)
                verdict = verify_sampled(tree, q, cands, self.generator)
            batch.cache.keep(lengths, verdict.keep_idx, verdict.count)
        counts = verdict.count.tolist()
        emitted = [t[:c] for t, c in zip(verdict.tokens.tolist(), counts)]
        tested, accepted = verdict.tested.tolist(), verdict.accepted.tolist()
        for row, new, tst, acc in zip(batch.rows, emitted, tested, accepted):
            self.emit(row, new, self.proposer.forwards_per_step)
            s = row.stats
            for i, (t, a) in enumerate(zip(tst, acc)):
                if t:
                    s.add_position(i, a)
                    s.proposed += 1
                    s.accepted += int(a)
        if not all(r.done for r in batch.rows):
            with self.clock("draft"):
                batch.state.commit(verdict, out, lengths, emitted)
        batch.roots = verdict.tokens.gather(1, (verdict.count - 1)[:, None]).squeeze(1)
