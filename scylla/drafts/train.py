"""Train a draft on hidden-state shards (or online features) with Lightning.

The output directory holds Lightning's resumable checkpoint (``checkpoints/last.ckpt``) and, at
the end, the draft (``draft/``, with its model card). ``train_draft`` called again on the same
directory resumes from the checkpoint and ends where an uninterrupted run ends. The command
and its MLflow run: ``scylla.commands.train``.

A draft records the corpus slices it was trained on (``slices``: [start, end, data], a token
range of the fixed training order of the text ``data`` names, see ``data_tag``) and their sum
(``cumulative_tokens``); ``TrainConfig.init_from`` continues it on the next ``train_tokens`` of
the current data it has not seen, so a budget accumulates across runs and machines, and a draft
trained on the corpus's replies can go on with the target's own answers (which start at 0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from scylla import paths
from scylla.config import DraftConfig, TrainConfig, as_params
from scylla.data.hidden_states import (
    HiddenStatesConfig,
    answers_key,
    open_corpus,
    slug,
)
from scylla.drafts.card import METRIC_PREFIXES
from scylla.drafts.checkpoint import draft_dir, load_draft, read_spec
from scylla.drafts.data import (
    DraftDataModule,
    SequenceSource,
    make_plan,
    prefix_length,
    shard_source,
    tokenized_source,
)
from scylla.drafts.io import save_pretrained
from scylla.drafts.model import DraftModel, draft_spec, instantiate
from scylla.drafts.module import DraftTraining, ttt_steps_of
from scylla.drafts.spec import DraftSpec
from scylla.drafts.vocab import (
    Vocabulary,
    build_d2t,
    load_vocab,
    save_vocab,
    token_counts,
)
from scylla.errors import ConfigError, DataError
from scylla.modeling.targets import TargetInfo

CKPT_DIR = "checkpoints"
# a continued draft's validation before training on its new slice, kept for a resumed run
START_METRICS = "start_metrics.json"
# Data flags of `scylla hidden-states` that `scylla train` shares (the budgets come from
# TrainConfig, the layers from DraftConfig)
DATA_SKIP = ("build_tokens", "val_tokens", "max_seq_len", "feature_layers", "tokens_per_shard",
             "build_batch_tokens", "answer_batch_size")


def data_tag(data: HiddenStatesConfig) -> str:
    """Names the text a slice was cut from: the corpus and whose answers it holds
    ('sharegpt', 'sharegpt-target-greedy-n512'); each has its own fixed order."""
    return answers_key(data, data.corpus)


def seen_slices(cfg: TrainConfig) -> list[list]:
    """[start, end, data] of every slice the draft ``cfg.init_from`` was trained on; [] for a
    new draft. A slice of two fields (drafts before slices named their data) is of the data
    its draft records as ``corpus``."""
    if not cfg.init_from:
        return []
    path = draft_dir(Path(cfg.init_from).expanduser())
    extra = read_spec(path).extra
    slices = extra.get("slices")
    if not slices:
        raise DataError(f"TrainConfig.init_from={cfg.init_from!r}: {path} records no corpus "
                        "slices (it was trained before drafts recorded them), so its unseen "
                        "data is unknown")
    return [list(s) if len(s) == 3 else [*s, extra.get("corpus", "")] for s in slices]


def seen_end(cfg: TrainConfig, tag: str) -> int:
    """Where the slices of data ``tag`` that ``cfg.init_from`` has seen end (0: none)."""
    return max((end for _, end, data in seen_slices(cfg) if data == tag), default=0)


def data_budget(cfg: TrainConfig, tag: str) -> int:
    """Tokens of the fixed order of data ``tag`` this training reads: the slices already seen
    plus ``train_tokens``, or the pretraining prefix when longer."""
    return max(seen_end(cfg, tag) + cfg.train_tokens, cfg.pretrain_tokens)


def data_config(draft_cfg: DraftConfig, cfg: TrainConfig, data: HiddenStatesConfig
                ) -> HiddenStatesConfig:
    """The hidden-states build whose shards this training reads."""
    return dataclasses.replace(
        data, build_tokens=data_budget(cfg, data_tag(data)), val_tokens=cfg.val_tokens,
        max_seq_len=cfg.max_seq_len,
        feature_layers=(draft_cfg.feature_layers or "eagle3") if draft_cfg.kind == "eagle3" else "")


def check_shards(source: SequenceSource, target: Any, cfg: TrainConfig,
                 layers: tuple[int, ...], where: str) -> None:
    h = source.header
    want = dataclasses.asdict(TargetInfo.of(target))
    if h.get("target") != want:
        raise DataError(f"{where} was built for target {h.get('target')}, not {want}")
    if h.get("max_seq_len") != cfg.max_seq_len:
        raise DataError(f"{where} was built with max_seq_len={h.get('max_seq_len')}, but "
                        f"TrainConfig.max_seq_len={cfg.max_seq_len}")
    missing = [i for i in layers if i not in h.get("layers", [])]
    if missing:
        raise DataError(f"{where} lacks target layers {missing} that the eagle3 draft fuses; "
                        "build shards with `scylla hidden-states --feature-layers eagle3`")


def shard_sources(root: Path, target: Any, cfg: TrainConfig, layers: tuple[int, ...], tag: str
                  ) -> tuple[SequenceSource, SequenceSource | None]:
    """The train and val shards under ``root`` of the data ``tag`` (``data_tag``)."""
    budget = data_budget(cfg, tag)
    train = shard_source(str(root / "train"), budget, "train_tokens", "--build-tokens")
    check_shards(train, target, cfg, layers, str(root / "train"))
    return train, val_shards(root, target, cfg, layers) if cfg.val_tokens else None


def val_shards(root: Path, target: Any, cfg: TrainConfig, layers: tuple[int, ...]
               ) -> SequenceSource:
    """The first ``cfg.val_tokens`` of the validation shards under ``root``, checked."""
    val = shard_source(str(root / "val"), cfg.val_tokens, "val_tokens", "--val-tokens")
    check_shards(val, target, cfg, layers, str(root / "val"))
    return val


def prefix_examples(corpus: Any, tokens: int, strict: bool) -> list[Any]:
    out, total = [], 0
    for e in corpus.examples():
        out.append(e)
        total += len(e.input_ids)
        if total >= tokens:
            return out
    if strict:
        raise DataError(f"the corpus holds {total} tokens, fewer than the budget {tokens}")
    return out


def online_sources(data: HiddenStatesConfig, target: Any, cfg: TrainConfig
                   ) -> tuple[SequenceSource, SequenceSource | None]:
    if data.answers != "corpus":
        raise ConfigError(f"HiddenStatesConfig.answers={data.answers!r}: online training reads "
                          "the corpus's own replies; train on shards built by `scylla "
                          "hidden-states --answers target` instead")
    budget = data_budget(cfg, data_tag(data))
    train = tokenized_source(prefix_examples(open_corpus(data, target.tokenizer, "train"),
                                             budget, strict=True))
    val = None
    if cfg.val_tokens:
        val = tokenized_source(prefix_examples(open_corpus(data, target.tokenizer, "val"),
                                               cfg.val_tokens, strict=False))
    return train, val


def draft_vocabulary(data: HiddenStatesConfig, target: Any, draft_cfg: DraftConfig,
                     cfg: TrainConfig, progress: bool = True) -> Vocabulary | None:
    """The fixed vocabulary a pruned draft chooses its tokens from (None when there is none
    to choose: full vocabulary, 'budget', or a continued draft, which keeps its own). For
    'corpus' it is counted once, then read from its file."""
    if not draft_cfg.draft_vocab_size or draft_cfg.vocab == "budget" or cfg.init_from:
        return None
    vocab_size = target.model.config.vocab_size
    if draft_cfg.vocab != "corpus":
        return load_vocab(Path(draft_cfg.vocab).expanduser(), target.name, vocab_size)
    corpus = open_corpus(data, target.tokenizer, "train", progress)
    # the cached counts of the tokenized training split: its cache key names order and tokenizer
    path = (paths.data_dir() / "vocab" / slug(target.name)
            / f"{corpus.dir.name}-{draft_cfg.vocab_tokens or 'all'}.safetensors")
    if path.is_file():
        return load_vocab(path, target.name, vocab_size)
    examples = list(corpus.examples(draft_cfg.vocab_tokens or None))
    tokens = sum(len(e.input_ids) for e in examples)
    counts = token_counts(((e.input_ids, e.loss_mask) for e in examples), vocab_size)
    source = (f"{data.corpus} training split (shuffle_seed {data.shuffle_seed}, max_seq_len "
              f"{data.max_seq_len}): first {tokens} tokens, {len(examples)} conversations")
    return save_vocab(Vocabulary(counts, source, target.name), path)


def vocab_map(train: SequenceSource, draft_cfg: DraftConfig, cfg: TrainConfig,
              target: Any, vocab: Vocabulary | None = None) -> torch.Tensor | None:
    """d2t: the ``draft_vocab_size`` most frequent tokens of ``vocab`` (the same for every
    budget), or with ``DraftConfig.vocab='budget'`` of the training budget (pretraining counts
    every token)."""
    if not draft_cfg.draft_vocab_size:
        return None
    eos = target.model.config.eos_token_ids
    if draft_cfg.vocab != "budget":
        if vocab is None:
            raise ConfigError(f"DraftConfig.vocab={draft_cfg.vocab!r} needs the vocabulary's "
                              "counts (scylla.drafts.train.draft_vocabulary); 'budget' counts "
                              "the training budget instead")
        return build_d2t(vocab.counts, draft_cfg.draft_vocab_size, eos)
    lengths = train.lengths
    sft = prefix_length(lengths, cfg.train_tokens)
    pre = prefix_length(lengths, cfg.pretrain_tokens) if cfg.pretrain_tokens else 0

    def seqs() -> Any:
        for i in range(max(sft, pre)):
            t = train.tokens(i)
            ids, mask = t["input_ids"], t["loss_mask"]
            if i < sft:
                yield ids, mask
            if i < pre:
                yield ids, torch.ones_like(mask)

    counts = token_counts(seqs(), target.model.config.vocab_size)
    return build_d2t(counts, draft_cfg.draft_vocab_size, eos)


def new_draft(target: Any, draft_cfg: DraftConfig, cfg: TrainConfig,
              d2t: torch.Tensor | None) -> DraftModel:
    spec = draft_spec(draft_cfg.kind, draft_cfg.draft_n_layer, target,
                      draft_cfg.draft_vocab_size, draft_cfg.feature_layers,
                      head=draft_cfg.head)
    torch.manual_seed(cfg.seed)  # the draft's initial weights are a function of the seed
    draft = instantiate(spec, target, d2t).float()
    draft.init_for_training()
    return draft


def check_continuable(spec: DraftSpec, where: str, target: Any, draft_cfg: DraftConfig,
                      cfg: TrainConfig) -> None:
    """Refuse to continue a draft of another target (DraftMismatchError), architecture, data
    order or with a pretraining stage (ConfigError naming the field)."""
    spec.check_target(target, where=where)
    want = draft_spec(draft_cfg.kind, draft_cfg.draft_n_layer, target,
                      draft_cfg.draft_vocab_size, draft_cfg.feature_layers,
                      head=draft_cfg.head)
    for name in ("kind", "draft_n_layer", "draft_vocab_size", "feature_layers", "head"):
        if getattr(spec, name) != getattr(want, name):
            raise ConfigError(f"{where} is a draft with {name}={getattr(spec, name)!r}; it "
                              f"cannot continue as DraftConfig.{name}={getattr(want, name)!r}")
    seen_len = spec.extra.get("train", {}).get("max_seq_len")
    if seen_len != cfg.max_seq_len:
        raise ConfigError(f"{where} was trained with max_seq_len={seen_len}, which orders the "
                          f"corpus otherwise than TrainConfig.max_seq_len={cfg.max_seq_len}")
    if cfg.pretrain_tokens:
        raise ConfigError(f"TrainConfig.pretrain_tokens={cfg.pretrain_tokens}: a continued "
                          "draft (init_from) trains SFT only")


def initial_draft(target: Any, draft_cfg: DraftConfig, cfg: TrainConfig, train: SequenceSource,
                  vocab: Vocabulary | None, tag: str = "") -> tuple[DraftModel, int]:
    """The draft training starts from and the first sequence of its slice: a new draft from
    sequence 0, or the draft ``cfg.init_from`` (its weights and vocabulary) from the sequence
    after the slices of data ``tag`` (``train``'s) it has seen."""
    if not cfg.init_from:
        return new_draft(target, draft_cfg, cfg, vocab_map(train, draft_cfg, cfg, target,
                                                           vocab)), 0
    path = draft_dir(Path(cfg.init_from).expanduser())
    where = f"TrainConfig.init_from={cfg.init_from!r}"
    check_continuable(read_spec(path), where, target, draft_cfg, cfg)
    seen, first, total = seen_end(cfg, tag), 0, 0
    while total < seen and first < len(train.lengths):
        total += train.lengths[first]
        first += 1
    if total != seen:
        raise DataError(f"{where}: its slices end at token {seen}, which is not a sequence "
                        f"boundary of this training data ({total} tokens at sequence {first}); "
                        "the corpus or its order differs")
    if first == len(train.lengths):
        raise DataError(f"{where}: the training data ends at token {seen}, where its slices "
                        "end; build more (a larger --build-tokens)")
    torch.manual_seed(cfg.seed)
    return load_draft(path, target).float().train(), first


def default_out(target: Any, params: dict[str, Any], draft_cfg: DraftConfig,
                cfg: TrainConfig) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    name = (f"{draft_cfg.kind}-L{draft_cfg.draft_n_layer}-V{draft_cfg.draft_vocab_size}"
            f"-T{cfg.train_tokens}" + (f"-P{cfg.pretrain_tokens}" if cfg.pretrain_tokens else "")
            + f"-s{cfg.seed}-{key[:8]}")
    return paths.data_dir() / "drafts" / slug(target.name) / name


def make_strategy(name: str) -> Any:
    """``ddp`` / ``ddp_spawn`` with gloo on CPU; the frozen target tensors the draft holds as
    buffers are never broadcast (they are identical on every rank and large)."""
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen",
                           broadcast_buffers=False,
                           process_group_backend=None if torch.cuda.is_available() else "gloo")
    return name


def check_strategy(strategy: str, accelerator: str) -> None:
    """Lightning 2.6 refuses FSDP without a CUDA accelerator (Lightning issue #21812, CPU
    FSDP not yet supported): say so in one line, in our flags, before the target loads."""
    from lightning.pytorch.strategies import FSDPStrategy

    if strategy not in FSDPStrategy.get_registered_strategies():
        return
    resolved = accelerator
    if accelerator == "auto":
        resolved = "cuda" if torch.cuda.is_available() else "cpu"
    if resolved not in ("cuda", "gpu"):
        raise ConfigError(f"--strategy {strategy} with --accelerator {accelerator}: FSDP needs "
                          "GPUs here (Lightning refuses it on CPU); use --accelerator gpu on "
                          "a GPU machine, or --strategy ddp on CPU")


RUN_PARAMS = "run_params.json"


def claim_out_dir(out: Path, params: dict[str, Any]) -> None:
    """Record what ``out`` trains; a later call with other params (which would resume a
    different run's checkpoint) raises ConfigError naming the fields that differ."""
    params = json.loads(json.dumps(params, default=str))
    recorded = out / RUN_PARAMS
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        diff = sorted(k for k in old.keys() | params.keys() if old.get(k) != params.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"{out} holds a training with other parameters ({changes}); "
                              "resuming it would mix two runs. Pass another --out or delete "
                              "that directory.")
        return
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(params, indent=1, sort_keys=True))


def train_draft(target: Any, draft_cfg: DraftConfig, cfg: TrainConfig, train: SequenceSource,
                val: SequenceSource | None, out_dir: str | Path, *,
                features: Callable[[dict, bool], dict] | None = None,
                logger: Any = False, accelerator: str = "auto", devices: int = 1,
                num_nodes: int = 1, strategy: str = "auto", progress: bool = True,
                max_steps: int = -1, corpus: str = "", vocab: Vocabulary | None = None
                ) -> dict[str, Any]:
    """Train (or resume) a draft; returns its metrics, ``draft_params`` and the draft path.

    ``vocab``: the fixed vocabulary of a pruned draft (``draft_vocabulary``); ``logger``: a
    Lightning logger (the command's MLflow run), or False; ``max_steps`` stops early (tests use
    it to simulate a kill: the checkpoint then resumes the same plan); ``corpus``
    names the training data (``data_tag``) in the draft's record and its slices.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = Path(out_dir)
    draft, first = initial_draft(target, draft_cfg, cfg, train, vocab, corpus)
    if features is None:
        missing = [i for i in draft.feature_layers if f"hidden.{i}" not in train.get(0)]
        if missing:
            raise DataError(f"the shards lack target layers {missing} that the eagle3 draft "
                            "fuses; build them with `scylla hidden-states --feature-layers "
                            f"{','.join(map(str, draft.feature_layers))}`")
    plan = make_plan(train.lengths, cfg.train_tokens, cfg.train_batch_size, cfg.epochs,
                     cfg.seed, cfg.pretrain_tokens, first)
    if not plan.batches:
        raise DataError("the training budget holds no sequence")
    start = sum(train.lengths[:first])
    end = start + sum(train.lengths[first:first + prefix_length(train.lengths[first:],
                                                                 cfg.train_tokens)])
    slices = [*seen_slices(cfg), [start, end, corpus]]
    claim_out_dir(out, {**{f"train.{k}": v for k, v in as_params(cfg).items()},
                        **{f"draft.{k}": v for k, v in as_params(draft_cfg).items()},
                        "plan": plan.digest, "target": TargetInfo.of(target).name})
    module = DraftTraining(draft, cfg, total_steps=len(plan.batches))
    datamodule = DraftDataModule(train, val, plan, cfg.train_batch_size, features)
    if logger:
        logger.log_hyperparams({"draft_params": draft.draft_params})  # rank 0 only
    ckpt = ModelCheckpoint(dirpath=out / CKPT_DIR, filename="step{step}", save_last=True,
                           save_top_k=1, every_n_train_steps=cfg.checkpoint_every)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        strategy=make_strategy(strategy),
        max_epochs=1, max_steps=max_steps, logger=logger, callbacks=[ckpt],
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=cfg.val_check_steps or None, limit_val_batches=1.0 if val else 0,
        gradient_clip_val=cfg.grad_clip or None, use_distributed_sampler=False,
        log_every_n_steps=min(10, max(1, len(plan.batches) // 20)), default_root_dir=out)
    last = out / CKPT_DIR / "last.ckpt"
    start = out / START_METRICS
    if cfg.init_from and val is not None and not last.is_file() and not start.is_file():
        # the continued draft on this validation text before its new slice (MLflow: step 0)
        (before,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        if trainer.is_global_zero:
            start.write_text(json.dumps({f"start/{k}": float(v) for k, v in before.items()}))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if start.is_file():
        result.update(json.loads(start.read_text()))
    result.update(draft_params=draft.draft_params, steps=trainer.global_step,
                  planned_steps=len(plan.batches), plan=plan.digest)
    if trainer.is_global_zero and trainer.global_step >= len(plan.batches):
        extra = {"train": as_params(cfg), "draft": as_params(draft_cfg), "corpus": corpus,
                 "ttt_steps": ttt_steps_of(cfg, draft_cfg.kind), "plan": plan.digest,
                 "slices": slices, "cumulative_tokens": sum(b - a for a, b, _ in slices)}
        if vocab is not None and not cfg.init_from:  # a continued draft keeps its record
            extra["vocab"] = vocab.record()
        metrics = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES)}
        # the checkpoint plus its model card (target, data, budgets, validation metrics)
        result["draft"] = str(save_pretrained(draft, out / "draft", extra, metrics))
    return result
