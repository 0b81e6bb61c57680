"""Save and load a draft in the form its kind is kept in, with its model card.

- Our training kinds (``scylla``, ``eagle3``): a checkpoint (``scylla.drafts.checkpoint``) plus
  a model card ``README.md`` (``scylla.drafts.card``).
- A served EAGLE-1/2 head (``ServedEagleDraft``, only ever imported): its export itself
  (``scylla.drafts.export``), which engines read.
``from_pretrained`` reads any of these directories (and a ``scylla train`` output directory).
This module is the one place that dispatches between the formats, so the model classes
import none of them.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scylla.drafts.card import train_metrics, write_card
from scylla.drafts.checkpoint import (
    CONFIG,
    WEIGHTS,
    load_draft,
    read_checkpoint,
    save_draft,
)
from scylla.drafts.export import export_draft, import_export, is_export
from scylla.drafts.model import DraftModel
from scylla.drafts.served import ServedEagleDraft
from scylla.errors import ConfigError
from scylla.modeling.targets import TargetInfo


def save_pretrained(draft: DraftModel, path: str | Path, extra: dict[str, Any] | None = None,
                    metrics: dict[str, float] | None = None,
                    bench: str | Path | dict[str, Any] | None = None) -> Path:
    """Write ``draft`` to directory ``path`` with its model card (training record from
    ``spec.extra`` and ``extra``, ``metrics`` such as ``val/tau_chain``, and the tau-per-category
    table of a ``scylla bench --json`` report ``bench``)."""
    if isinstance(draft, ServedEagleDraft):
        return export_draft(draft, path, "eagle", extra, metrics, bench)
    out = save_draft(draft, path, extra)
    write_card(out, dataclasses.replace(draft.spec, extra={**draft.spec.extra, **(extra or {})}),
               draft.draft_params, metrics, bench)
    return out


def from_pretrained(path: str | Path, target: Any) -> DraftModel:
    """The draft at ``path`` wired to ``target``: a checkpoint, a ``scylla train`` output
    directory, a directory written by ``scylla export`` (EAGLE / EAGLE-3 layout), or
    ``"default"``: the draft shipped in this package for ``target`` (``shipped_draft``). Raises
    DraftMismatchError when ``target`` is not the one the draft belongs to."""
    if str(path) == DEFAULT:
        path = shipped_draft(TargetInfo.of(target).name)
    return import_export(path, target) if is_export(path) else load_draft(path, target)


DEFAULT = "default"  # --draft default: the shipped draft of the target
SHIPPED = Path(__file__).parent / "shipped"  # one directory per target name


def is_shipped(target_name: str) -> bool:
    """A draft ships in this package for ``target_name``."""
    return (SHIPPED / target_name).is_dir()


def shipped_draft(target_name: str) -> Path:
    """The directory of the draft shipped for ``target_name``; ConfigError when there is none."""
    path = SHIPPED / target_name
    if not is_shipped(target_name):
        have = sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
        raise ConfigError(f"--draft {DEFAULT}: no draft is shipped for target {target_name!r} "
                          f"(shipped: {', '.join(have) or 'none'}); train one with "
                          "`scylla train` and pass its directory")
    return path


def ship(src: str | Path, out: str | Path,
         bench: str | Path | dict[str, Any] | None = None) -> Path:
    """A trained checkpoint rewritten for the repository: its floating-point weights in
    bfloat16 (half the bytes; ``load_draft`` casts them back to the target's dtype) beside its
    config and a model card with the training metrics (and ``bench``'s tau per category)."""
    path, spec, state = read_checkpoint(src)
    small = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(small, str(out / WEIGHTS))
    shutil.copyfile(path / CONFIG, out / CONFIG)
    params = json.loads((path / CONFIG).read_text()).get("draft_params", 0)
    write_card(out, spec, params, train_metrics(path), bench)
    return out
