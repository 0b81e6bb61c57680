"""What one forward of k new tokens costs on a filled cache: the number that sizes a tree.

A speculative step costs one target forward over the whole tree plus one draft forward per
tree level; it pays off only when the accepted length beats that cost measured in plain steps.
On a GPU a forward of 16 tokens costs about what one token costs; on a CPU it does not, so the
tree must be sized on the machine that runs it (``scylla bench --forward-cost 1,2,4,8,16``).

Each forward appends k tokens with a causal tree mask (the verification path) to a cache
holding ``context`` tokens, is timed device-synchronised, and is cut off again, so every
repeat sees the same cache. The median of the repeats is reported, after untimed warm-ups.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from scylla.decoding.timing import synchronize

WARMUPS = 2  # first calls allocate buffers and pick kernels


def _median_ms(run: Any, device: torch.device, repeats: int) -> float:
    for _ in range(WARMUPS):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def forward_cost(model: Any, ks: list[int], context: int = 256, draft: Any = None,
                 repeats: int = 5, seed: int = 0) -> list[dict[str, float]]:
    """Milliseconds per forward of k tokens for the target (and the draft, with its LM head),
    per k in ``ks``, at decode batch size 1 on a cache of ``context`` random tokens."""
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (1, context + max(ks)), generator=gen).to(device)
    layers = tuple(draft.feature_layers) if draft is not None else ()
    cache = model.new_cache(1, context + max(ks))
    out = model(ids[:, :context], cache=cache, hidden_layers=layers, compute_logits=False)
    start = cache.lengths.clone()
    if draft is not None:
        feats = draft.features(out)  # (1, context, F)
        dcache = draft.new_cache(1, context + max(ks))
        draft(ids[:, 1:context + 1], feats, cache=dcache, compute_logits=False)

    rows = []
    for k in ks:
        new = ids[:, context:context + k]
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril()
        pos = start[:, None] + torch.arange(k, device=device)

        def target_step() -> None:
            model(new, cache=cache, position_ids=pos, tree_mask=causal, hidden_layers=layers)
            cache.set_lengths(start)

        row = {"k": k, "target_ms": _median_ms(target_step, device, repeats)}
        if draft is not None:
            dfeats = feats[:, -1:].expand(-1, k, -1)

            def draft_step() -> None:
                draft(new, dfeats, cache=dcache, position_ids=pos, tree_mask=causal)
                dcache.set_lengths(start)

            row["draft_ms"] = _median_ms(draft_step, device, repeats)
        rows.append(row)
    return rows


def format_forward_cost(rows: list[dict[str, float]], context: int) -> str:
    one = rows[0]["target_ms"] if rows[0]["k"] == 1 else None
    head = f"forward of k new tokens on a {context}-token cache, batch 1 (median ms)"
    lines = [head, f"{'k':>4} {'target ms':>10} {'x k=1':>7} {'draft ms':>9}"]
    for r in rows:
        ratio = f"{r['target_ms'] / one:7.2f}" if one else f"{'-':>7}"
        draft = f"{r['draft_ms']:9.1f}" if "draft_ms" in r else f"{'-':>9}"
        lines.append(f"{r['k']:>4} {r['target_ms']:10.1f} {ratio} {draft}")
    return "\n".join(lines)
