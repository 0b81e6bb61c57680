"""Model cards: the ``README.md`` written next to a saved or exported draft.

The Hugging Face Hub shows a repository's README.md, with its YAML header, as the model card.
Ours says what the draft is (target, kind, layers, vocabulary, size), how it was trained (the
budgets ``scylla train`` records in the checkpoint's ``extra``, and its validation metrics when
given or found in ``result.json`` next to the draft), its tau per category when a
``scylla bench --json`` report is given, and, for an export, how vLLM and SGLang load it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scylla.drafts.spec import DraftSpec
from scylla.errors import DataError

# the metrics a card records: training, validation, and a continued draft's validation before
# its new slice (``start/val/*``)
METRIC_PREFIXES = ("train/", "val/", "start/val/")

CARD = "README.md"
TRAIN_RESULT = "result.json"  # written by `scylla train` in the directory holding draft/
# the training record worth a reader's time, in this order (all of TrainConfig is in extra)
TRAIN_FIELDS = ("corpus", "slices", "cumulative_tokens", "vocab", "train_tokens",
                "pretrain_tokens", "val_tokens", "epochs", "train_batch_size", "max_seq_len", "lr",
                "ttt_steps", "seed", "online")
ALGORITHMS = {"eagle": ("eagle", "EAGLE"), "eagle3": ("eagle3", "EAGLE3")}  # vLLM, SGLang


def train_metrics(draft_dir: str | Path) -> dict[str, float]:
    """The ``METRIC_PREFIXES`` metrics of the ``scylla train`` run that wrote ``draft_dir`` ({}
    when the draft was saved some other way)."""
    path = Path(draft_dir).parent / TRAIN_RESULT
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e})") from e
    return {k: float(v) for k, v in result.items()
            if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))}


def read_bench(bench: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A ``scylla bench --json`` report (a path or the loaded dict), checked for what the
    card reads: ``methods[].method``, ``.tau`` and ``.per_category[cat].tau``."""
    report = bench
    if not isinstance(bench, dict):
        try:
            report = json.loads(Path(bench).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"--bench {bench}: cannot read a bench report ({e})") from e

    def number(x: Any) -> bool:
        return isinstance(x, (int, float))

    try:
        ok = all(isinstance(m["method"], str) and number(m["tau"])
                 and all(number(c["tau"]) for c in m["per_category"].values())
                 for m in report["methods"])
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"bench report {'' if isinstance(bench, dict) else bench} is not a "
                        "`scylla bench --json` report (methods[].method, .tau, "
                        ".per_category[].tau)")
    return report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _about(spec: DraftSpec, draft_params: int) -> list[str]:
    t = spec.target
    feature = (f"target hidden states {list(spec.feature_layers)} (HF hidden_states indices)"
               if spec.feature_layers else "the target's last hidden state (after its norm)")
    vocab = (f"pruned to {spec.draft_vocab_size} of the target's {t.vocab_size} tokens"
             if spec.draft_vocab_size else f"the target's full vocabulary ({t.vocab_size})")
    return _table(["", ""], [
        ["target", f"`{t.name}` (hidden {t.hidden_size}, {t.num_hidden_layers} layers)"],
        ["draft kind", f"`{spec.kind}`"], ["draft layers", str(spec.draft_n_layer)],
        ["feature", feature], ["vocabulary", vocab],
        ["LM head", "its own, trained and stored with it" if spec.head == "trained"
         or spec.kind == "eagle3" else "the target's rows, frozen (not stored)"],
        ["trainable parameters", f"{draft_params:,}"]])


def _training(spec: DraftSpec, metrics: dict[str, float]) -> list[str]:
    train = dict(spec.extra.get("train", {}))
    if "ttt_steps" in spec.extra:  # the resolved value (TrainConfig's 0 means the kind's default)
        train["ttt_steps"] = spec.extra["ttt_steps"]
    if spec.extra.get("corpus"):
        train["corpus"] = spec.extra["corpus"]
    if spec.extra.get("slices"):  # token ranges of the fixed order of the data each names
        train["slices"] = " + ".join(f"[{a}, {b})" + (f" of {d[0]}" if d and d[0] else "")
                                     for a, b, *d in spec.extra["slices"])
        train["cumulative_tokens"] = spec.extra["cumulative_tokens"]
    if spec.extra.get("vocab"):
        train["vocab"] = (f"{spec.extra['vocab']['source']} "
                          f"(digest {spec.extra['vocab']['digest']})")
    lines = ["## Training", ""]
    if not train:
        lines.append("The checkpoint records no training configuration.")
    else:
        lines += _table(["setting", "value"],
                        [[f"`{k}`", str(train[k])] for k in TRAIN_FIELDS if k in train])
    if metrics:
        lines += ["", *_table(["metric", "value"],
                              [[f"`{k}`", f"{v:.4g}"] for k, v in sorted(metrics.items())])]
    return lines


def _tau_table(bench: dict[str, Any]) -> list[str]:
    methods = bench["methods"]
    cats = sorted({c for m in methods for c in m["per_category"]})
    rows = [[c, *(f"{m['per_category'][c]['tau']:.2f}" if c in m["per_category"] else "-"
                  for m in methods)] for c in cats]
    rows.append(["**all**", *(f"{m['tau']:.2f}" for m in methods)])
    where = ", ".join(f"{k}: {bench[k]}" for k in ("num_prompts", "machine") if k in bench)
    return ["## Acceptance (tau per category)", "",
            f"From `scylla bench` ({where}); tau = new tokens per target forward.", "",
            *_table(["category", *(f"`{m['method']}`" for m in methods)], rows)]


def _serving(spec: DraftSpec, export: dict[str, Any]) -> list[str]:
    vllm, sglang = ALGORITHMS[export["format"]]
    name = spec.target.name
    target = name if "/" in name else f"<HF checkpoint dir of target {name}>"
    token_map = (f" \\\n    --speculative-token-map <this directory>/{export['token_map']}"
                 if export.get("token_map") else "")
    lines = ["## Serving", "",
             f"Layout `{export['architecture']}` with {export['num_hidden_layers']} layer(s)."]
    if export.get("pass_through_layer"):
        lines.append("Its first layer is an all-zero pass-through (EAGLE's first layer has no "
                     "input norm, this draft's has), so engines run one layer more than the "
                     "draft has.")
    if export["format"] == "eagle":
        lines.append("SGLang runs it exactly; vLLM's EAGLE head has no fc bias (it ignores "
                     "`fc.bias`) and no pruned vocabulary (it drafts over the full one).")
    lines += ["scylla's tests do not run these engines (CPU only); its docs/export.md lists "
              "the caveats.", "",
              "```sh", f"vllm serve {target} --speculative-config \\",
              f"    '{{\"method\": \"{vllm}\", \"model\": \"<this directory>\", "
              "\"num_speculative_tokens\": 5}'",
              f"python3 -m sglang.launch_server --model {target} \\",
              f"    --speculative-algorithm {sglang} "
              f"--speculative-draft-model-path <this directory>{token_map}", "```"]
    return lines


def render(spec: DraftSpec, draft_params: int, metrics: dict[str, float] | None = None,
           bench: str | Path | dict[str, Any] | None = None,
           export: dict[str, Any] | None = None) -> str:
    """The card's markdown. ``export``: {format, architecture, num_hidden_layers,
    pass_through_layer, token_map} of a ``scylla export`` directory."""
    t = spec.target
    header = ["---", "library_name: scylla",
              "tags: [speculative-decoding, eagle, draft-model]"]
    if "/" in t.name:  # a Hub id: link the card to its base model
        header.append(f"base_model: {t.name}")
    lines = [*header, "---", "", f"# `{spec.kind}` draft for `{t.name}`", "",
             "A speculative-decoding draft head (EAGLE-style: it reads the target's hidden "
             "states and proposes tokens the target verifies), written by scylla.", "",
             *_about(spec, draft_params), "", *_training(spec, metrics or {})]
    if bench is not None:
        lines += ["", *_tau_table(read_bench(bench))]
    if export is not None:
        lines += ["", *_serving(spec, export)]
    return "\n".join(lines) + "\n"


def write_card(directory: str | Path, spec: DraftSpec, draft_params: int,
               metrics: dict[str, float] | None = None,
               bench: str | Path | dict[str, Any] | None = None,
               export: dict[str, Any] | None = None) -> Path:
    path = Path(directory) / CARD
    path.write_text(render(spec, draft_params, metrics, bench, export))
    return path
