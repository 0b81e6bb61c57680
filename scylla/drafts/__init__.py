"""Draft models (plain ``nn.Module``s) and their training (Lightning).

``DraftModel`` / ``load_draft`` / ``save_draft`` are the interface decoding uses; training
lives in ``scylla.drafts.module`` (LightningModule), ``.data`` (DataModule) and ``.train``
(``scylla train``).
"""
from scylla.drafts.checkpoint import load_draft, save_draft
from scylla.drafts.model import (DraftModel, DraftOutput, Eagle3Draft, ScyllaDraft, draft_spec,
                                 instantiate)
from scylla.drafts.spec import DraftSpec, TargetInfo

__all__ = ["DraftModel", "DraftOutput", "DraftSpec", "Eagle3Draft", "ScyllaDraft", "TargetInfo",
           "draft_spec", "instantiate", "load_draft", "save_draft"]
