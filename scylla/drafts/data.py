"""DataModules for draft training: hidden-state shards, or the target run online.

Training follows a *plan*, a pure function of the data and the config: the list of global
batches (sequence indices of the fixed order) for every stage and epoch:

1. optional pretraining: the prefix reaching ``pretrain_tokens``, loss on every token;
2. SFT: the prefix reaching ``train_tokens``, loss on assistant tokens only; a continued draft
   (``TrainConfig.init_from``) takes the sequences reaching ``train_tokens`` from sequence
   ``first`` on, the first it has not seen.

Each stage's prefix is reshuffled per epoch with a seed derived from (seed, stage, epoch). A
resumed run skips the plan's first ``global_step`` batches, which makes it repeat an
uninterrupted run exactly; under DDP rank r takes rows r, r+W, ... of every global batch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from scylla.data.shards import ShardReader, budget_prefix, load_manifest
from scylla.errors import ConfigError, DataError


class PlanItem(NamedTuple):
    seq: int  # index in the fixed order
    full_mask: bool  # pretraining stage: loss on every token
    tokens_seen: int  # tokens of all global batches up to and including this one


@dataclass(frozen=True)
class Plan:
    batches: list[list[PlanItem]]

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([[tuple(i) for i in b] for b in self.batches]).encode())
        return h.hexdigest()[:16]


def prefix_length(lengths: Sequence[int], tokens: int) -> int:
    """Sequences in the shortest prefix holding >= ``tokens`` tokens (all if none does)."""
    total = 0
    for i, n in enumerate(lengths):
        total += n
        if total >= tokens:
            return i + 1
    return len(lengths)


def make_plan(lengths: Sequence[int], train_tokens: int, train_batch_size: int, epochs: int,
              seed: int, pretrain_tokens: int = 0, first: int = 0) -> Plan:
    """Global batches of ``train_batch_size`` sequences (see the module docstring). A last
    batch under half the size joins the one before it, so no rank is ever left empty."""
    stages = (([(pretrain_tokens, True, 0)] if pretrain_tokens else [])
              + [(train_tokens, False, first)])
    batches: list[list[PlanItem]] = []
    seen = 0
    for s, (budget, full, start) in enumerate(stages):
        n = prefix_length(lengths[start:], budget)
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 1_000_003 + s * 1009 + epoch)
            order = [start + i for i in torch.randperm(n, generator=g).tolist()]
            groups = [order[i:i + train_batch_size] for i in range(0, n, train_batch_size)]
            if len(groups) > 1 and len(groups[-1]) < max(1, train_batch_size // 2):
                groups[-2].extend(groups.pop())
            for grp in groups:
                seen += sum(lengths[i] for i in grp)
                batches.append([PlanItem(i, full, seen) for i in grp])
    return Plan(batches)


class PlanSampler(Sampler[list[PlanItem]]):
    """This rank's part of each planned global batch, from batch ``start`` on.

    Its length is the whole plan's: a resumed Lightning epoch counts the ``start`` batches it
    already did and expects only the rest.
    """

    def __init__(self, plan: Plan, rank: int = 0, world: int = 1, start: int = 0):
        self.plan, self.rank, self.world, self.start = plan, rank, world, start

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[list[PlanItem]]:
        for batch in self.plan.batches[self.start:]:
            yield batch[self.rank::self.world]


class ResumableLoader(DataLoader):
    """A DataLoader Lightning treats as resumable: its state is the plan's digest, checked on
    resume so that a run never continues on other data than it started with (the position in
    the plan comes from ``trainer.global_step``)."""

    def __init__(self, *args: Any, plan_digest: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan_digest = plan_digest

    def state_dict(self) -> dict[str, Any]:
        return {"plan_digest": self.plan_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("plan_digest") != self.plan_digest:
            raise ConfigError("the checkpoint was trained on another data plan (budget, batch "
                              "size, seed or shards differ); resume with the same config")


class SequenceSource(Dataset):
    """Sequences of the order: a ShardReader (features included) or tokenized examples.

    ``get(i)`` gives all tensors of sequence i, ``tokens(i)`` only input_ids and loss_mask.
    """

    def __init__(self, get: Callable[[int], dict[str, torch.Tensor]], lengths: list[int],
                 tokens: Callable[[int], dict[str, torch.Tensor]] | None = None,
                 header: dict[str, Any] | None = None):
        self.get, self.lengths = get, lengths
        self.tokens = tokens or get
        self.header = header or {}  # the shard build's header (shards only)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, item: PlanItem | int) -> dict[str, Any]:
        seq = item.seq if isinstance(item, PlanItem) else item
        row = dict(self.get(seq))
        if isinstance(item, PlanItem):
            row["full_mask"], row["tokens_seen"] = item.full_mask, item.tokens_seen
        return row


# Batch widths are rounded up to a multiple of this: CPU BLAS kernels are prepared once per
# matrix shape (~25 ms each, measured), which a new width on every batch would pay each step.
PAD_MULTIPLE = 64


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad the rows to a common width: input_ids (B, T) long, loss_mask (B, T) float (0
    on padding; every real token in pretraining), features (B, T, H) each."""
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    out: dict[str, Any] = {}
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = r["input_ids"].long()
        mask[b, :n] = 1.0 if r.get("full_mask") else r["loss_mask"].float()
    out["input_ids"], out["loss_mask"] = ids, mask
    if "target_argmax" in rows[0]:
        argmax = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            argmax[b, :len(r["target_argmax"])] = r["target_argmax"].long()
        out["target_argmax"] = argmax
    for key in rows[0]:
        if key == "last_hidden" or key.startswith("hidden."):
            feat = torch.zeros(len(rows), width, rows[0][key].shape[-1], dtype=rows[0][key].dtype)
            for b, r in enumerate(rows):
                feat[b, :len(r[key])] = r[key]
            out[key] = feat
    out["tokens_seen"] = max(r.get("tokens_seen", 0) for r in rows)
    return out


class DraftDataModule(L.LightningDataModule):
    """Train and validation batches for a draft (from shards, or tokenized + ``features``).

    ``train`` / ``val``: SequenceSource over the fixed order; ``features``: for online mode,
    a function adding the target's features to a batch already on the device.
    """

    def __init__(self, train: SequenceSource, val: SequenceSource | None, plan: Plan,
                 train_batch_size: int, features: Callable[[dict, bool], dict] | None = None):
        super().__init__()
        self.train_source, self.val_source, self.plan = train, val, plan
        self.train_batch_size = train_batch_size
        self.features = features

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        # a plan's batches hold at least half of train_batch_size sequences (see make_plan)
        if world > 1 and self.train_batch_size < 2 * world:
            raise ConfigError(f"TrainConfig.train_batch_size={self.train_batch_size}: must be "
                              f">= 2 x the {world} processes, so that every process gets a "
                              "share of every batch")
        start = self.trainer.global_step if self.trainer is not None else 0
        sampler = PlanSampler(self.plan, rank, world, start)
        return ResumableLoader(self.train_source, batch_sampler=sampler, collate_fn=collate,
                               plan_digest=self.plan.digest)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        rank, world = self._rank_world()
        n = len(self.val_source)
        batches = [list(range(i, min(i + self.train_batch_size, n)))
                   for i in range(0, n, self.train_batch_size)]
        mine = [b[rank::world] for b in batches if b[rank::world]]
        return DataLoader(self.val_source, batch_sampler=mine, collate_fn=collate)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.features is None:
            return batch
        trainer = self.trainer
        return self.features(batch, bool(trainer and (trainer.validating
                                                      or trainer.sanity_checking)))


def shard_source(directory: str, tokens: int, what: str, build_flag: str) -> SequenceSource:
    """The prefix of the shards in ``directory`` reaching ``tokens`` (checked, memory-mapped);
    ``what`` names the budget, ``build_flag`` the `scylla hidden-states` flag that extends it."""
    manifest = load_manifest(directory)
    if manifest.total_tokens < tokens and not manifest.complete:
        raise DataError(f"{directory} holds {manifest.total_tokens} tokens, fewer than "
                        f"{what}={tokens}; extend it with `scylla hidden-states "
                        f"{build_flag} {tokens}` (it resumes where it stopped)")
    n_seq, _ = budget_prefix(manifest, tokens)
    reader = ShardReader(directory, n_seq)
    return SequenceSource(reader.get, reader.lengths(),
                          lambda i: reader.get(i, ("input_ids", "loss_mask")), manifest.header)


def tokenized_source(examples: Sequence[Any]) -> SequenceSource:
    """Online mode: tokenized examples (``.input_ids``, ``.loss_mask`` numpy arrays)."""
    def get(i: int) -> dict[str, torch.Tensor]:
        e = examples[i]
        return {"input_ids": torch.from_numpy(e.input_ids.astype("int64")),
                "loss_mask": torch.from_numpy(e.loss_mask.astype("uint8"))}

    return SequenceSource(get, [len(e.input_ids) for e in examples])


def online_features(model: Any, layers: Sequence[int]
                    ) -> Callable[[dict, bool], dict]:
    """``add(batch, validating)`` puts ``last_hidden`` (and ``hidden.<i>``; ``target_argmax``
    when validating) into a batch by running the frozen target on the batch's device."""
    def add(batch: dict, validating: bool) -> dict:
        device = batch["input_ids"].device
        if model.embed_tokens.weight.device != device:
            model.to(device)
        with torch.inference_mode():
            out = model(batch["input_ids"], cache=None, hidden_layers=tuple(layers),
                        compute_logits=validating)
        # clone outside inference mode: training saves these for backward
        batch["last_hidden"] = out.last_hidden.clone()
        for i in layers:
            batch[f"hidden.{i}"] = out.hidden[i].clone()
        if validating:
            batch["target_argmax"] = out.logits.argmax(-1)
        return batch

    return add
