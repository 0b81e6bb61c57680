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
from pathlib import Path
from typing import Any

from scylla.drafts.card import write_card
from scylla.drafts.checkpoint import load_draft, save_draft
from scylla.drafts.export import export_draft, import_export, is_export
from scylla.drafts.model import DraftModel
from scylla.drafts.served import ServedEagleDraft


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
    directory, or a directory written by ``scylla export`` (EAGLE / EAGLE-3 layout). Raises
    DraftMismatchError when ``target`` is not the one the draft belongs to."""
    return import_export(path, target) if is_export(path) else load_draft(path, target)
