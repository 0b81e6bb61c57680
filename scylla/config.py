"""Typed configuration. One spelling per knob: dataclass field = CLI flag = MLflow param.

Every field carries its documentation in ``metadata["help"]`` (the CLI shows it) and is
validated in ``__post_init__`` so that a bad value fails early with an error naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from scylla.errors import ConfigError  # noqa: F401  (re-exported for users of config)


def doc(help_text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (shown by ``scylla <cmd> --help``)."""
    return field(default=default, metadata={"help": help_text}, **kwargs)


def check(ok: bool, owner: str, name: str, value: Any, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}={value!r}: {expectation}")


def as_params(cfg: Any) -> dict[str, Any]:
    """Flat ``{field: value}`` for MLflow params / run matching."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TargetSpec:
    target: str = doc(
        "Target model: registry name (see `scylla targets`), Hugging Face hub id, or local "
        "directory holding an HF checkpoint.",
        "smollm2-135m-instruct",
    )
    dtype: str = doc("Weights dtype: auto (bf16 on CUDA when supported, else fp32), float32, "
                     "bfloat16, float16.", "auto")
    device: str = doc("Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps.",
                      "auto")

    def __post_init__(self) -> None:
        check(bool(self.target), "TargetSpec", "target", self.target, "must not be empty")
        check(self.dtype in DTYPES, "TargetSpec", "dtype", self.dtype, f"one of {DTYPES}")


DECODE_METHODS = ("hf", "plain", "pld", "hf-assisted-pld", "chain", "tree", "static-tree",
                  "hybrid")


@dataclass
class DecodeConfig:
    method: str = doc(f"Decoding method, one of {DECODE_METHODS}.", "plain")
    max_new_tokens: int = doc("New tokens per prompt at most (EOS stops a row earlier).", 128)
    decode_batch_size: int = doc("Prompts decoded together, each row at its own pace.", 1)
    temperature: float = doc("Sampling temperature; 0 means greedy.", 0.0)
    sample_top_p: float = doc("Nucleus sampling mass, applied identically to target and draft.",
                              1.0)
    draft_len: int = doc("Chain drafting and prompt lookup (pld, hybrid): tokens proposed per "
                         "step.", 4)
    # EAGLE-2 uses depth 5-7, top-k 10, 60 tokens on GPUs; on a 2-core CPU the verify cost
    # grows with every tree token (k=16 costs 3.2x a k=1 forward), so defaults are smaller.
    tree: str = doc("tree and hybrid: 'auto' = the planner sizes the tree (total tokens, depth, "
                    "lookup tokens, or no speculation at all) from this machine's measured "
                    "forward costs and the draft's measured acceptance; 'fixed' = tree_depth, "
                    "tree_total_tokens and draft_len as given.", "auto")
    tree_top_k: int = doc("Dynamic tree: children expanded per frontier node.", 4)
    tree_depth: int = doc("Dynamic tree: draft steps per verification.", 5)
    tree_total_tokens: int = doc("Dynamic tree: draft tokens kept for verification.", 12)
    static_tree: str = doc("Static tree: comma-separated branch choices such as "
                           "'0,1,00,01,10,000' (each digit the rank of the child).",
                           "0,1,2,00,01,10,000,001,0000")
    pld_ngram: int = doc("Prompt lookup: longest n-gram matched in the context.", 3)
    seed: int = doc("Random seed for sampling.", 0)

    def __post_init__(self) -> None:
        o = "DecodeConfig"
        check(self.method in DECODE_METHODS, o, "method", self.method, f"one of {DECODE_METHODS}")
        check(self.max_new_tokens >= 1, o, "max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.decode_batch_size >= 1, o, "decode_batch_size", self.decode_batch_size, ">= 1")
        check(self.temperature >= 0, o, "temperature", self.temperature, ">= 0")
        check(0 < self.sample_top_p <= 1, o, "sample_top_p", self.sample_top_p, "in (0, 1]")
        check(self.draft_len >= 1, o, "draft_len", self.draft_len, ">= 1")
        check(self.tree in ("auto", "fixed"), o, "tree", self.tree, "'auto' or 'fixed'")
        check(self.tree_top_k >= 1, o, "tree_top_k", self.tree_top_k, ">= 1")
        check(self.tree_depth >= 1, o, "tree_depth", self.tree_depth, ">= 1")
        check(self.tree_total_tokens >= 1, o, "tree_total_tokens", self.tree_total_tokens, ">= 1")
        check(self.pld_ngram >= 1, o, "pld_ngram", self.pld_ngram, ">= 1")


DRAFT_KINDS = ("scylla", "eagle3")
HEADS = ("target", "trained")  # DraftConfig.head


@dataclass
class DraftConfig:
    kind: str = doc(f"Draft architecture, one of {DRAFT_KINDS}.", "scylla")
    draft_n_layer: int = doc("Decoder layers in the draft (the capacity axis).", 1)
    draft_vocab_size: int = doc("Pruned draft vocabulary (the most frequent tokens of "
                                "`vocab`); 0 keeps the target's full vocabulary.", 0)
    vocab: str = doc("Token counts that choose the pruned vocabulary: 'corpus' = the assistant "
                     "tokens of the first vocab_tokens of the training split (counted once, "
                     "cached as a vocabulary file under the data dir), the same for every "
                     "budget; a path = that vocabulary file; 'budget' = the training budget "
                     "itself (how the drafts of docs/results.md were trained).", "corpus")
    vocab_tokens: int = doc("vocab='corpus': tokens of the fixed training order counted; "
                            "0 = the whole training split.", 0)
    feature_layers: str = doc("eagle3: target hidden_states indices fused as low,mid,high "
                              "(e.g. '2,15,27'); '' = EAGLE-3's (2, L//2, L-3).", "")
    head: str = doc("scylla: the draft's LM head: 'target' = the target's frozen rows of the "
                    "draft vocabulary (shared, not stored with the draft); 'trained' = a copy "
                    "of them trained with the draft and stored with it (eagle3 always trains "
                    "its own).", "target")

    def __post_init__(self) -> None:
        o = "DraftConfig"
        check(self.kind in DRAFT_KINDS, o, "kind", self.kind, f"one of {DRAFT_KINDS}")
        check(self.draft_n_layer >= 1, o, "draft_n_layer", self.draft_n_layer, ">= 1")
        check(self.draft_vocab_size >= 0, o, "draft_vocab_size", self.draft_vocab_size, ">= 0")
        check(bool(self.vocab), o, "vocab", self.vocab, "'corpus', 'budget' or a file path")
        check(self.vocab_tokens >= 0, o, "vocab_tokens", self.vocab_tokens, ">= 0")
        check(not self.feature_layers or self.kind == "eagle3", o, "feature_layers",
              self.feature_layers, "only for kind='eagle3'")
        check(self.head in HEADS, o, "head", self.head, f"one of {HEADS}")
        check(self.head == "target" or self.kind == "scylla", o, "head", self.head,
              "'target' for kind='eagle3' (its head is always its own, trained)")
        check(self.kind != "eagle3" or self.draft_n_layer == 1, o, "draft_n_layer",
              self.draft_n_layer, "1 for kind='eagle3' (EAGLE-3 as vLLM and SGLang serve it)")


@dataclass
class TrainConfig:
    train_tokens: int = doc("Data budget: the shortest prefix of the fixed shuffled order "
                            "reaching this many tokens (the data axis).", 1_000_000)
    # Small budgets need optimiser steps more than large batches: on SmolLM2 + ShareGPT, a
    # 1-layer draft on 60k tokens reached val top-1 10.4% with 2 sequences per step at lr 1e-3,
    # 2.5% with 8 at 3e-4, 7.0% with 2 at 3e-3 (measured; 1 sequence per step: 10.8%).
    train_batch_size: int = doc("Sequences per optimiser step.", 2)
    max_seq_len: int = doc("Sequences are cut to this many tokens.", 1024)
    lr: float = doc("Peak learning rate (AdamW).", 1e-3)
    # EAGLE-1/2: w_hidden=1, w_logits=0.1, uniform feature noise U(-0.1, 0.1)... see SCYLLA.md
    w_hidden: float = doc("Weight of SmoothL1 on the predicted feature.", 1.0)
    w_logits: float = doc("Weight of CE between draft and target distributions.", 0.1)
    feature_noise: float = doc("Half-width of uniform noise added to input features.", 0.2)
    epochs: int = doc("Passes over the budget.", 1)
    seed: int = doc("Random seed (data order within the budget, init, noise).", 0)
    pretrain_tokens: int = doc("Two stages: pretrain on this many tokens of plain text (loss on "
                               "every token) before SFT on train_tokens with assistant-only "
                               "masks; 0 = SFT only.", 0)
    val_tokens: int = doc("Validation budget: prefix of the held-out split.", 20_000)
    ttt_steps: int = doc("Training-time test: steps the draft is unrolled on its own features "
                         "during training; 0 = the kind's default (scylla 1, eagle3 3).", 0)
    ttt_decay: float = doc("Weight of unrolled step k is ttt_decay**k (EAGLE-3: 0.8).", 0.8)
    distill_top_k: int = doc("Distil only the target's K most likely tokens (HASS's top-K "
                             "distillation): the cross-entropy term sums over them alone; 0 = "
                             "the full soft cross-entropy. Validation always uses the full one.",
                             0)
    val_chain_len: int = doc("Chain length gamma of val/tau_chain (draft steps unrolled).", 5)
    warmup_steps: int = doc("Linear learning-rate warm-up steps (then cosine decay to "
                            "lr/10 at the last step).", 10)
    grad_clip: float = doc("Gradient-norm clipping (EAGLE: 0.5); 0 disables it.", 0.5)
    checkpoint_every: int = doc("Save a resumable checkpoint every this many steps.", 50)
    val_check_steps: int = doc("Validate every this many steps as well; 0 = at the end only.",
                               0)
    init_from: str = doc("Continue this draft (a `scylla train` output or draft directory): "
                         "start from its weights and vocabulary and train on the train_tokens "
                         "of the fixed order that follow the slices it has seen.", "")
    online: bool = doc("Run the target inside the training step instead of reading hidden-"
                       "state shards (for budgets too large to cache).", False)

    def __post_init__(self) -> None:
        o = "TrainConfig"
        check(self.train_tokens >= 1, o, "train_tokens", self.train_tokens, ">= 1")
        check(self.train_batch_size >= 1, o, "train_batch_size", self.train_batch_size, ">= 1")
        check(self.max_seq_len >= 2, o, "max_seq_len", self.max_seq_len, ">= 2")
        check(self.lr > 0, o, "lr", self.lr, "> 0")
        check(self.w_hidden >= 0, o, "w_hidden", self.w_hidden, ">= 0")
        check(self.w_logits >= 0, o, "w_logits", self.w_logits, ">= 0")
        check(self.w_hidden + self.w_logits > 0, o, "w_logits", self.w_logits,
              "w_hidden + w_logits must be > 0")
        check(self.feature_noise >= 0, o, "feature_noise", self.feature_noise, ">= 0")
        check(self.epochs >= 1, o, "epochs", self.epochs, ">= 1")
        check(self.pretrain_tokens >= 0, o, "pretrain_tokens", self.pretrain_tokens, ">= 0")
        check(self.val_tokens >= 0, o, "val_tokens", self.val_tokens, ">= 0")
        check(self.ttt_steps >= 0, o, "ttt_steps", self.ttt_steps, ">= 0")
        check(0 < self.ttt_decay <= 1, o, "ttt_decay", self.ttt_decay, "in (0, 1]")
        check(self.distill_top_k >= 0, o, "distill_top_k", self.distill_top_k, ">= 0")
        check(self.val_chain_len >= 1, o, "val_chain_len", self.val_chain_len, ">= 1")
        check(self.warmup_steps >= 0, o, "warmup_steps", self.warmup_steps, ">= 0")
        check(self.grad_clip >= 0, o, "grad_clip", self.grad_clip, ">= 0")
        check(self.checkpoint_every >= 1, o, "checkpoint_every", self.checkpoint_every, ">= 1")
        check(self.val_check_steps >= 0, o, "val_check_steps", self.val_check_steps, ">= 0")
