"""The EAGLE-1/2 head exactly as vLLM and SGLang run it.

Our ``scylla`` draft differs from it (its first layer has an input norm), so it is exported with
a pass-through first layer (see ``scylla.drafts.export``). An imported EAGLE head becomes this
class, the engines' computation written with our building blocks, and ``export_draft`` writes
it back unchanged. (EAGLE-3 heads need no such class: our ``eagle3`` kind is built exactly as
the engines serve it.)

- ``ServedEagleDraft`` (EAGLE-1/2, ``LlamaForCausalLMEagle``): ``fc([embed(x); feature]) :
  2H -> H``, then Llama decoder layers of which the first has no input norm (vLLM's and SGLang's
  ``llama_eagle.py`` replace it by the identity), no final norm, read out by the target's LM head
  (the rows of a pruned vocabulary). The feature is the target's post-norm last hidden state.

It shares the target's frozen embedding (as the engines do). It is not a training kind; its
saved form is the export itself (``scylla.drafts.io.save_pretrained`` writes it).
"""
from __future__ import annotations

import torch
from torch import nn

from scylla.drafts.model import DraftModel
from scylla.drafts.spec import DraftSpec


class ServedEagleDraft(DraftModel):
    """EAGLE-1/2 as served: our Scylla draft without the first layer's input norm."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        super().__init__(spec, embed_weight, target_head_weight, d2t)
        self.layers[0].input_layernorm = nn.Identity()


SERVED: dict[str, type[DraftModel]] = {"served-eagle": ServedEagleDraft}
