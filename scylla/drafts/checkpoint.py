"""Draft checkpoints: ``draft.safetensors`` (trainable weights, d2t) + ``draft.json`` (DraftSpec).

The frozen embedding and LM head belong to the target and are not saved; ``load_draft`` takes
them from the target it is given, after checking that it is the target the draft was built for
(name, hidden size, vocabulary, number of layers), else DraftMismatchError.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scylla.drafts.model import DraftModel, instantiate
from scylla.drafts.spec import DraftSpec
from scylla.errors import DataError

WEIGHTS = "draft.safetensors"
CONFIG = "draft.json"


def save_draft(draft: DraftModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the draft to directory ``path`` (created); ``extra`` goes into the JSON config."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    spec = draft.spec.to_json()
    spec["extra"] = {**spec["extra"], **(extra or {})}
    spec["draft_params"] = draft.draft_params
    (out / (CONFIG + ".tmp")).write_text(json.dumps(spec, indent=1))
    os.replace(out / (CONFIG + ".tmp"), out / CONFIG)
    return out


def read_spec(path: str | Path) -> DraftSpec:
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        raise DataError(f"{cfg}: no draft config here (expected a directory written by "
                        "save_draft / `scylla train`)")
    try:
        return DraftSpec.from_json(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{cfg}: malformed draft config ({e})") from e


def draft_dir(path: str | Path) -> Path:
    """``path``, or its ``draft/`` when ``path`` is a ``scylla train`` output directory."""
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / "draft" / CONFIG).is_file():
        return path / "draft"
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in directory ``path``."""
    weights = path / WEIGHTS
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{weights}: cannot read draft weights ({e})") from e


def read_checkpoint(path: str | Path) -> tuple[Path, DraftSpec, dict[str, torch.Tensor]]:
    """(directory, spec, state) of a draft checkpoint (see ``draft_dir``)."""
    path = draft_dir(path)
    return path, read_spec(path), read_weights(path)


def load_draft(path: str | Path, target: Any) -> DraftModel:
    """The draft saved at ``path`` (see ``read_checkpoint``), wired to ``target``'s frozen
    embedding and LM head. Raises DraftMismatchError when ``target`` is not the one the draft
    was trained for (checked before the weights are read)."""
    path = draft_dir(path)
    spec = read_spec(path)
    spec.check_target(target, where=f"draft {path}")
    state = read_weights(path)
    draft = instantiate(spec, target, state.get("d2t"))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{path / WEIGHTS} does not match its config {CONFIG}: missing "
                        f"{missing}, unexpected {unexpected}")
    return draft.to(dtype=target.model.embed_tokens.weight.dtype).eval()
