"""The decoding methods ``scylla bench`` and ``scylla generate`` call, by name.

Each is ``fn(target, prompts, cfg, draft) -> DecodeResult`` (target:
``scylla.modeling.targets.Target``, prompts: token ids, cfg: ``DecodeConfig``, draft: a
``DraftModel`` or None); the name, not ``cfg.method``, decides the method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from scylla.config import DecodeConfig
from scylla.decoding.drafter import DraftProposer
from scylla.decoding.engine import Decoder, Proposer
from scylla.decoding.expand import TreeShape, chain_shape, dynamic_shape, static_shape
from scylla.decoding.hybrid import HybridProposer
from scylla.decoding.plain import run_plain
from scylla.decoding.planner import AutoPlanner
from scylla.decoding.pld import PldProposer
from scylla.decoding.result import DecodeResult
from scylla.decoding.tree import parse_static_tree
from scylla.errors import ConfigError

SPECULATIVE = ("chain", "tree", "static-tree", "pld", "hybrid")
DRAFTED = ("chain", "tree", "static-tree", "hybrid")  # the methods that need a draft model


def tree_shape(cfg: DecodeConfig) -> TreeShape:
    if cfg.method == "chain":
        return chain_shape(cfg.draft_len)
    if cfg.method in ("tree", "hybrid"):
        return dynamic_shape(cfg.tree_top_k, cfg.tree_depth, cfg.tree_total_tokens)
    return static_shape(parse_static_tree(cfg.static_tree))


def proposer_for(target: Any, cfg: DecodeConfig, draft: Any) -> Proposer:
    if cfg.method == "pld":
        return PldProposer(cfg.pld_ngram, cfg.draft_len, cfg.temperature)
    if draft is None:
        raise ConfigError(f"DecodeConfig.method={cfg.method!r} needs a draft model (--draft)")
    shape = tree_shape(cfg)
    vocab = target.model.config.vocab_size
    draft_vocab = vocab if draft.d2t is None else draft.d2t.shape[0]
    if max(shape.children) > draft_vocab:
        raise ConfigError(f"{cfg.method}: {max(shape.children)} children per node exceed the "
                          f"draft vocabulary of {draft_vocab} tokens (lower tree_top_k)")
    drafter = DraftProposer(draft, shape, cfg.temperature, cfg.sample_top_p, vocab)
    if cfg.method not in ("tree", "hybrid"):
        return drafter
    lookup = cfg.method == "hybrid"
    if cfg.tree == "fixed":
        return HybridProposer(drafter, cfg.pld_ngram, cfg.draft_len) if lookup else drafter
    planner = AutoPlanner(target.model, draft, cfg.tree_top_k, cfg.pld_ngram if lookup else 0,
                          cfg.decode_batch_size, cfg.temperature)
    return HybridProposer(drafter, cfg.pld_ngram, 0, planner)


def speculative(target: Any, prompts: list[list[int]], cfg: DecodeConfig, draft: Any = None,
                on_emit: Callable[[int, list[int]], None] | None = None) -> DecodeResult:
    """Decode with ``cfg.method`` (one of SPECULATIVE) on the shared engine."""
    proposer = proposer_for(target, cfg, draft)
    if not prompts:
        return DecodeResult([], [], {"draft": 0.0, "verify": 0.0, "other": 0.0, "total": 0.0})
    with torch.inference_mode():
        result = Decoder(target.model, prompts, proposer, cfg.max_new_tokens,
                         cfg.decode_batch_size, cfg.temperature, cfg.sample_top_p, cfg.seed,
                         on_emit).run()
    if isinstance(proposer, HybridProposer) and proposer.plan is not None:
        result.plan = {**proposer.plan.as_dict(), "plans": proposer.planner.plans,
                       "calibrated": proposer.planner.calibrated}
    return result


def _method(name: str) -> Callable[..., DecodeResult]:
    def run(target: Any, prompts: list[list[int]], cfg: DecodeConfig, draft: Any = None
            ) -> DecodeResult:
        return speculative(target, prompts, dataclasses.replace(cfg, method=name), draft)

    run.__name__ = run.__qualname__ = "run_" + name.replace("-", "_")
    run.__doc__ = f"``{name}`` decoding (see scylla.decoding.methods.speculative)."
    return run


METHODS: dict[str, Callable[..., DecodeResult]] = {
    "plain": run_plain, **{name: _method(name) for name in SPECULATIVE}}
