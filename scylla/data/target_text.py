"""``scylla hidden-states --answers target``: shards of the target's own answers, with the
target's features recorded by the very forwards that write them (no second pass).

Each conversation of the split, in the hidden-states builder's fixed order
(``scylla.data.corpus``: train shuffled with ``shuffle_seed``, val in file order), gives its first
user turn, rendered with the chat template and its generation prompt (``prompt_ids``). The
target answers it: greedy, or sampled at ``answer_temperature`` from a generator of the
conversation's own (seeded by ``answer_seed`` and the conversation id), up to
``answer_max_new_tokens`` tokens; an EOS token ends the answer and is kept (the end-of-turn
marker the corpus masks too). A conversation whose prompt leaves no room for one answer token
under ``max_seq_len`` is skipped.

A stored sequence is prompt + answer with ``loss_mask`` 1 on the answer tokens only, in exactly
the format of ``scylla.data.shards``: the prompt's features come from its prefill forward, each
answer token's from the decode forward that takes it as input (the answer's last token gets one
more forward for its feature), so position t holds what one forward over the whole sequence
gives at t, up to floating-point rounding. Validation shards also hold ``target_argmax``.

Rows are decoded ``answer_batch_size`` at a time over one KV cache with a length per row; a
finished row takes the next conversation at once (its cache row is prefilled on its own), so
no row waits for the longest answer of a batch, and no row's answer depends on the others.
Shards are cut as by ``build_shards``: the shortest prefix of the order reaching
``tokens_per_shard``, whatever the batch size. A killed build continues after its last complete
shard; answers decoded beyond the last shard written are dropped (and decoded again then).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from scylla.data.hidden_states import (
    HiddenStatesConfig,
    build_splits,
    feature_layer_indices,
    open_build,
)
from scylla.data.prompts import prompt_ids
from scylla.data.shards import ShardInfo, save_manifest, write_shard
from scylla.errors import ConfigError, DataError

LOGITS_ROWS = 256  # prompt positions per LM-head product for target_argmax (bounds its memory)


@dataclass(frozen=True)
class AnswerPrompt:
    """One conversation's prompt: its id and the token ids the target continues from."""

    id: str
    ids: list[int]


@dataclass
class AnswerRow:
    """A finished sequence: prompt + answer ids, the answer mask, the features (and argmax)."""

    id: str
    input_ids: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (T,) uint8, 1 on the answer
    features: dict[str, torch.Tensor]  # "last_hidden" / "hidden.<i>" -> (T, H) storage dtype
    target_argmax: torch.Tensor | None  # (T,) int32 when asked for
    ended_by_eos: bool


@dataclass
class AnswerStats:
    """Counts of one build call (all decoded answers, written to shards or not)."""

    answers: int = 0
    answer_tokens: int = 0
    eos_answers: int = 0
    prompts_skipped: int = 0
    forward_tokens: int = 0  # tokens through the target: prompts + answers


@dataclass
class _Slot:
    index: int  # position in the order (of usable prompts)
    prompt: AnswerPrompt
    cap: int  # answer tokens at most
    prefill: dict[str, torch.Tensor]  # name -> (P, H) storage dtype
    prefill_argmax: torch.Tensor | None  # (P,) int32
    generator: torch.Generator | None
    answer: list[int] = field(default_factory=list)
    steps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> [(H,)]
    argmax: list[int] = field(default_factory=list)


def row_seed(seed: int, conv_id: str) -> int:
    """The seed of one conversation's sampling generator: fixed by ``seed`` and its id alone,
    so an answer depends neither on the batch nor on where a resumed build starts."""
    digest = hashlib.sha256(f"{seed}\0{conv_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def answer_room(prompt_len: int, max_seq_len: int, context: int, max_new_tokens: int) -> int:
    """Answer tokens a prompt of ``prompt_len`` tokens may get (0: skip the conversation)."""
    return max(0, min(max_new_tokens, max_seq_len - prompt_len, context - prompt_len))


def _names(layers: Sequence[int]) -> list[str]:
    return ["last_hidden"] + [f"hidden.{i}" for i in layers]


@torch.inference_mode()
def generate_answers(model: Any, prompts: Iterator[AnswerPrompt], *, max_seq_len: int,
                     max_new_tokens: int, eos_token_ids: Sequence[int],
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                     layers: Sequence[int] = (), hidden_dtype: str = "bfloat16",
                     store_argmax: bool = False, stats: AnswerStats | None = None,
                     on_forward: Callable[[int], None] = lambda n: None
                     ) -> Iterator[AnswerRow]:
    """Answer ``prompts`` with the target, yielding finished rows in the prompts' order.

    Prompts without room for an answer (``answer_room``) are skipped and counted. Closing the
    iterator early drops the rows still being decoded.
    """
    if max_new_tokens < 1 or batch_size < 1 or max_seq_len < 2 or temperature < 0:
        raise ConfigError(f"generate_answers: max_new_tokens={max_new_tokens} and batch_size="
                          f"{batch_size} must be >= 1, max_seq_len={max_seq_len} >= 2, "
                          f"temperature={temperature} >= 0")
    stats = AnswerStats() if stats is None else stats
    dtype = getattr(torch, hidden_dtype)
    device = model.device
    context = model.config.max_position_embeddings
    eos = set(eos_token_ids)
    layers = tuple(layers)
    names = _names(layers)
    lm_head = model.lm_head

    def usable() -> Iterator[AnswerPrompt]:
        for p in prompts:
            if answer_room(len(p.ids), max_seq_len, context, max_new_tokens) < 1:
                stats.prompts_skipped += 1
                continue
            yield p

    def pick(logits: torch.Tensor, slot: _Slot, greedy: int) -> int:
        if temperature == 0:
            return greedy
        p = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(p, 1, generator=slot.generator))

    def admit(row: int, index: int, prompt: AnswerPrompt) -> _Slot:
        """Prefill ``prompt`` into cache row ``row`` (on its own) and draw its first token."""
        n = len(prompt.ids)
        cache.lengths[row] = 0
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)
        out = model(ids, cache=cache.row(row), hidden_layers=layers, compute_logits=False)
        on_forward(n)
        stats.forward_tokens += n
        feats = {"last_hidden": out.last_hidden[0].to("cpu", dtype)}
        for i in layers:
            feats[f"hidden.{i}"] = out.hidden[i][0].to("cpu", dtype)
        prefill_argmax = None
        if store_argmax:
            prefill_argmax = torch.cat([lm_head(out.last_hidden[0, a:a + LOGITS_ROWS]).argmax(-1)
                                        for a in range(0, n, LOGITS_ROWS)]).to("cpu", torch.int32)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device).manual_seed(row_seed(seed, prompt.id))
        slot = _Slot(index, prompt, answer_room(n, max_seq_len, context, max_new_tokens),
                     feats, prefill_argmax, generator, steps={k: [] for k in names})
        logits = lm_head(out.last_hidden[0, -1])  # (V,)
        slot.answer.append(pick(logits, slot, int(logits.argmax())))
        return slot

    def finish(slot: _Slot) -> AnswerRow:
        n, m = len(slot.prompt.ids), len(slot.answer)
        feats = {k: torch.cat([slot.prefill[k], torch.stack(slot.steps[k])]) for k in names}
        argmax = None
        if store_argmax:
            argmax = torch.cat([slot.prefill_argmax,
                                torch.tensor(slot.argmax, dtype=torch.int32)])
        mask = np.zeros(n + m, dtype=np.uint8)
        mask[n:] = 1
        ended = slot.answer[-1] in eos
        stats.answers += 1
        stats.answer_tokens += m
        stats.eos_answers += ended
        return AnswerRow(slot.prompt.id, np.asarray(slot.prompt.ids + slot.answer, np.int32),
                         mask, feats, argmax, ended)

    source = usable()
    first = [p for _, p in zip(range(batch_size), source)]
    if not first:
        return
    cache = model.new_cache(len(first), max_seq_len)
    slots: list[_Slot | None] = [admit(r, r, p) for r, p in enumerate(first)]
    lengths = [len(p.ids) for p in first]
    cache.set_lengths(lengths)
    next_index, exhausted = len(first), len(first) < batch_size
    done: dict[int, AnswerRow] = {}  # finished rows waiting for an earlier one
    next_out = 0
    while slots:
        ids = torch.tensor([[s.answer[-1]] for s in slots], dtype=torch.long, device=device)
        out = model(ids, cache=cache, hidden_layers=layers, compute_logits=False)
        on_forward(len(slots))
        stats.forward_tokens += len(slots)
        step = {"last_hidden": out.last_hidden[:, 0].to("cpu", dtype)}
        for i in layers:
            step[f"hidden.{i}"] = out.hidden[i][:, 0].to("cpu", dtype)
        logits = lm_head(out.last_hidden[:, 0])  # (B, V)
        greedy = logits.argmax(-1).tolist()
        freed = []
        for r, slot in enumerate(slots):
            lengths[r] += 1
            for k in names:
                slot.steps[k].append(step[k][r])
            if store_argmax:
                slot.argmax.append(greedy[r])
            if slot.answer[-1] in eos or len(slot.answer) >= slot.cap:
                done[slot.index] = finish(slot)
                freed.append(r)
            else:
                slot.answer.append(pick(logits[r], slot, greedy[r]))
        for r in freed:
            slots[r] = None
            prompt = None if exhausted else next(source, None)
            if prompt is None:
                exhausted = True
                continue
            slots[r] = admit(r, next_index, prompt)
            lengths[r] = len(prompt.ids)
            next_index += 1
        if freed:
            keep = [r for r, s in enumerate(slots) if s is not None]
            cache.set_lengths(lengths)
            if len(keep) < len(slots):  # the prompts ran out: shrink the batch
                cache = cache.select(keep)
                slots = [slots[r] for r in keep]
                lengths = [lengths[r] for r in keep]
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


def rows_to_tensors(rows: Sequence[AnswerRow], layers: Sequence[int],
                    store_argmax: bool) -> dict[str, torch.Tensor]:
    """Lay rows out flat as ``shard_tensors`` does (see shards.py)."""
    lengths = [len(r.input_ids) for r in rows]
    out = {k: torch.cat([r.features[k] for r in rows]) for k in _names(layers)}
    if store_argmax:
        out["target_argmax"] = torch.cat([r.target_argmax for r in rows])
    out["input_ids"] = torch.from_numpy(np.concatenate([r.input_ids for r in rows]))
    out["loss_mask"] = torch.from_numpy(np.concatenate([r.loss_mask for r in rows]))
    out["offsets"] = torch.from_numpy(
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return out


def check_resume(directory: Path, info: ShardInfo, prompt: AnswerPrompt) -> None:
    """The last sequence built must start with the prompt the order now has at its place."""
    with safe_open(str(directory / info.file), framework="pt") as f:
        offsets = f.get_tensor("offsets").tolist()
        stored = f.get_slice("input_ids")[offsets[-2]:offsets[-1]].tolist()
    if stored[:len(prompt.ids)] != prompt.ids:
        raise DataError(f"{directory}: the prompt of conversation {prompt.id!r} is not the one "
                        "its shards were built from; the corpus or the chat template changed "
                        "since the build began (choose another --shards directory)")


def build_answer_shards(model: Any, prompts: Iterator[AnswerPrompt], directory: str | Path,
                        header: dict[str, Any], stop_tokens: int, *, max_seq_len: int,
                        max_new_tokens: int, eos_token_ids: Sequence[int],
                        temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                        layers: Sequence[int] = (), hidden_dtype: str = "bfloat16",
                        tokens_per_shard: int = 65536, store_argmax: bool = False,
                        progress: bool = True,
                        on_shard: Callable[[ShardInfo], None] = lambda info: None
                        ) -> dict[str, Any]:
    """``build_shards`` for the target's answers: extend the shards in ``directory`` until they
    hold ``stop_tokens`` tokens (or the prompts end). ``prompts`` yields the whole order from
    its start; the conversations already in shards are skipped, not decoded again."""
    directory = Path(directory)
    manifest = open_build(directory, header)
    stats = AnswerStats()
    result = {"tokens_built": 0, "seconds": 0.0, "total_tokens": manifest.total_tokens,
              "shards": len(manifest.shards), "complete": manifest.complete}
    if manifest.complete or manifest.total_tokens >= stop_tokens:
        return {**result, **dataclasses.asdict(stats)}
    context = model.config.max_position_embeddings

    def with_room() -> Iterator[AnswerPrompt]:  # what generate_answers keeps, to skip by it
        for p in prompts:
            if answer_room(len(p.ids), max_seq_len, context, max_new_tokens) >= 1:
                yield p
            else:
                stats.prompts_skipped += 1

    usable = with_room()
    last = None
    for _ in range(manifest.total_sequences):
        last = next(usable, None)
        if last is None:
            raise DataError(f"{directory}: the corpus now holds fewer conversations than the "
                            f"{manifest.total_sequences} already built; it changed since the "
                            "build began")
    if last is not None:
        check_resume(directory, manifest.shards[-1], last)
    bar = tqdm(total=stop_tokens, initial=min(manifest.total_tokens, stop_tokens), unit="tok",
               unit_scale=True, desc=f"target answers {directory.name}", disable=not progress)
    rows = generate_answers(model, usable, max_seq_len=max_seq_len,
                            max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                            temperature=temperature, seed=seed, batch_size=batch_size,
                            layers=layers, hidden_dtype=hidden_dtype, store_argmax=store_argmax,
                            stats=stats, on_forward=bar.update)
    built, seconds = 0, 0.0
    try:
        while manifest.total_tokens < stop_tokens:
            pending, tokens = [], 0
            start = time.perf_counter()  # decoding time only, as build_shards times forwards
            while tokens < tokens_per_shard:
                row = next(rows, None)
                if row is None:
                    break
                pending.append(row)
                tokens += len(row.input_ids)
            seconds += time.perf_counter() - start
            if pending:
                built += tokens
                info = write_shard(directory, len(manifest.shards),
                                   rows_to_tensors(pending, layers, store_argmax),
                                   manifest.total_tokens)
                manifest.shards.append(info)
                bar.set_postfix(answers=stats.answers, eos=f"{stats.eos_answers}",
                                refresh=False)
            if tokens < tokens_per_shard:  # the prompts ran out
                manifest.complete = True
            save_manifest(directory, manifest)
            if pending:
                on_shard(info)
            if manifest.complete:
                break
    finally:
        rows.close()
        bar.close()
    return {"tokens_built": built, "seconds": seconds, "total_tokens": manifest.total_tokens,
            "shards": len(manifest.shards), "complete": manifest.complete,
            **dataclasses.asdict(stats)}


# ---------------------------------------------------------------------------------------------
# corpus + target -> shard directories


def prompt_stream(conversations: Sequence[Any], tokenizer: Any) -> Iterator[AnswerPrompt]:
    """The first user turn of each conversation, in order, as the target's prompt."""
    for conv in conversations:
        yield AnswerPrompt(conv.id, prompt_ids(tokenizer, conv.user_turns()[0]))


def build_target_text(target: Any, cfg: HiddenStatesConfig, progress: bool = True,
                      on_shard: Callable[[ShardInfo], None] = lambda info: None
                      ) -> dict[str, Any]:
    """``build_hidden_states`` for ``cfg.answers == 'target'``: build (or extend) the train and
    val shards of the target's answers; returns the root directory and per-split counts."""
    if cfg.answers != "target":
        raise ConfigError(f"HiddenStatesConfig.answers={cfg.answers!r}: build_target_text "
                          "builds answers='target'")
    layers = feature_layer_indices(cfg.feature_layers, target.model.config.num_hidden_layers)

    def build(corpus: Any, directory: Path, header: dict[str, Any], budget: int,
              split_cfg: HiddenStatesConfig, split: str) -> dict[str, Any]:
        # the builder's own order of the split (nothing is tokenized here)
        return build_answer_shards(
            target.model, prompt_stream(corpus.conversations, target.tokenizer), directory,
            header, budget, max_seq_len=cfg.max_seq_len,
            max_new_tokens=cfg.answer_max_new_tokens, eos_token_ids=target.eos_token_ids,
            temperature=cfg.answer_temperature, seed=cfg.answer_seed,
            batch_size=cfg.answer_batch_size, layers=layers, hidden_dtype=cfg.hidden_dtype,
            tokens_per_shard=split_cfg.tokens_per_shard, store_argmax=split == "val",
            progress=progress, on_shard=on_shard)

    return build_splits(target, cfg, progress, build)
