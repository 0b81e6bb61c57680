"""Draft models (plain ``nn.Module``s) and their training (Lightning).

``DraftModel`` / ``from_pretrained`` / ``save_pretrained`` (``.io``) are the interface the commands
use, ``.checkpoint`` the raw checkpoint format; training
lives in ``scylla.drafts.module`` (LightningModule), ``.data`` (DataModule) and ``.train``
(``scylla train``); ``.export`` writes / reads the EAGLE and EAGLE-3 layouts vLLM and SGLang serve
(``scylla export``), ``.served`` the EAGLE-1/2 head as served, ``.card`` the model card.
"""
from scylla.drafts.checkpoint import load_draft, save_draft
from scylla.drafts.export import export_draft, import_export
from scylla.drafts.io import from_pretrained, save_pretrained
from scylla.drafts.model import (
                                 DraftModel,
                                 DraftOutput,
                                 Eagle3Draft,
                                 ScyllaDraft,
                                 draft_spec,
                                 instantiate,
)
from scylla.drafts.served import ServedEagleDraft
from scylla.drafts.spec import DraftSpec
from scylla.modeling.targets import TargetInfo

__all__ = ["DraftModel", "DraftOutput", "DraftSpec", "Eagle3Draft", "ScyllaDraft",
           "ServedEagleDraft", "TargetInfo", "draft_spec", "export_draft",
           "from_pretrained", "import_export", "instantiate", "load_draft", "save_draft",
           "save_pretrained"]
