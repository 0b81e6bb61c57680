"""What one forward of k new tokens costs on a filled cache: the number that sizes a tree.

A speculative step costs one target forward over the whole tree plus one draft forward per
tree level; it pays off only when the accepted length beats that cost measured in plain steps.
On a GPU a forward of 16 tokens costs about what one token costs; on a CPU it does not, so the
tree must be sized on the machine that runs it (``scylla bench --forward-cost 1,2,4,8,16``).

Each forward appends k tokens with a causal tree mask (the verification path) to a cache
holding ``context`` tokens, is timed device-synchronised, and is cut off again, so every
repeat sees the same cache. All forwards (every k, target and draft) are timed round-robin
and the median of the repeats is reported, after untimed warm-ups. Each k's cost is printed next
to its floors on this machine's measured roofline (``scylla.decoding.roofline``).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from scylla.decoding.roofline import floors_ms, measure_roofline
from scylla.decoding.timing import synchronize

WARMUPS = 2  # first calls allocate buffers and pick kernels


def interleaved_median_ms(runs: dict[Any, Callable[[], None]], device: torch.device,
                           repeats: int) -> dict[Any, float]:
    """Median ms of each run, timed round-robin (a, b, c, a, b, c, ...) after warm-ups, so a
    burst of load on a shared machine hits every run alike instead of one k's block."""
    for run in runs.values():
        for _ in range(WARMUPS):
            run()
    times: dict[Any, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def forward_cost(model: Any, ks: list[int], context: int = 256, draft: Any = None,
                 repeats: int = 5, seed: int = 0, roofline: bool = True, batch: int = 1
                 ) -> list[dict[str, float]]:
    """Milliseconds per forward of k tokens per row for the target (and the draft, with its LM
    head), per k in ``ks``, at decode batch size ``batch`` on caches of ``context`` random
    tokens.

    With ``roofline``, each row also holds the forward's bytes and FLOPs and their floors at
    this machine's measured bandwidth and GEMM peak (``scylla.decoding.roofline``)."""
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (batch, context + max(ks)), generator=gen).to(device)
    layers = tuple(draft.feature_layers) if draft is not None else ()
    cache = model.new_cache(batch, context + max(ks))
    out = model(ids[:, :context], cache=cache, hidden_layers=layers, compute_logits=False)
    start = cache.lengths.clone()
    runs: dict[tuple[str, int], Callable[[], None]] = {}
    if draft is not None:
        feats = draft.features(out)  # (1, context, F)
        dcache = draft.new_cache(batch, context + max(ks))
        draft(ids[:, 1:context + 1], feats, cache=dcache, compute_logits=False)
    for k in ks:
        new = ids[:, context:context + k]
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril().expand(batch, k, k)
        pos = start[:, None] + torch.arange(k, device=device)
        runs["target_ms", k] = timed_forward(model, cache, start, new, pos, causal,
                                             hidden_layers=layers)
        if draft is not None:
            runs["draft_ms", k] = timed_forward(draft, dcache, start, new, pos, causal,
                                                features=feats[:, -1:].expand(-1, k, -1))
    ms = interleaved_median_ms(runs, device, repeats)
    rows = [{"k": k, **{name: t for (name, kk), t in ms.items() if kk == k}} for k in ks]
    if roofline and device.type == "cpu" and batch == 1:
        roof = measure_roofline()
        for r in rows:
            r.update(floors_ms(model, r["k"], context, roof), **roof.as_dict())
    return rows


def timed_forward(model: Any, cache: Any, start: torch.Tensor, new: torch.Tensor,
                  pos: torch.Tensor, causal: torch.Tensor, features: torch.Tensor | None = None,
                  hidden_layers: tuple[int, ...] = ()) -> Callable[[], None]:
    """One verification-style forward of ``new`` on ``cache``, cut back to ``start`` after."""
    def run() -> None:
        if features is None:
            model(new, cache=cache, position_ids=pos, tree_mask=causal, hidden_layers=hidden_layers)
        else:
            model(new, features, cache=cache, position_ids=pos, tree_mask=causal)
        cache.set_lengths(start)
    return run


def format_forward_cost(rows: list[dict[str, float]], context: int, batch: int = 1) -> str:
    """The table: per k, target ms, its ratio to k = 1, draft ms, and (when measured) the
    forward's floors: bytes / stream bandwidth and FLOPs / GEMM peak, and target ms over the
    larger floor."""
    one = rows[0]["target_ms"] if rows[0]["k"] == 1 else None
    roof = "bw_floor_ms" in rows[0]
    head = (f"forward of k new tokens per row on a {context}-token cache, batch {batch} "
            "(median ms)")
    if roof:
        head += (f"; roofline: read {rows[0]['bandwidth_gbs']:.1f} GB/s, "
                 f"GEMM {rows[0]['gemm_gflops']:.0f} GFLOP/s")
    cols = f"{'k':>4} {'target ms':>10} {'x k=1':>7} {'draft ms':>9}"
    if roof:
        cols += f" {'MB':>6} {'GFLOP':>6} {'bw floor':>9} {'flop floor':>10} {'x floor':>8}"
    lines = [head, cols]
    for r in rows:
        ratio = f"{r['target_ms'] / one:7.2f}" if one else f"{'-':>7}"
        draft = f"{r['draft_ms']:9.1f}" if "draft_ms" in r else f"{'-':>9}"
        line = f"{r['k']:>4} {r['target_ms']:10.1f} {ratio} {draft}"
        if roof:
            floor = max(r["bw_floor_ms"], r["flop_floor_ms"])
            line += (f" {r['bytes'] / 1e6:6.0f} {r['flops'] / 1e9:6.2f} {r['bw_floor_ms']:9.1f}"
                     f" {r['flop_floor_ms']:10.1f} {r['target_ms'] / floor:8.2f}")
        lines.append(line)
    return "\n".join(lines)
