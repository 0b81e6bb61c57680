"""Draft layouts exactly as vLLM and SGLang run EAGLE and EAGLE-3 heads.

Our own drafts (``scylla.drafts.model``) differ from what the engines compute, so a trained draft
can only be exported where a faithful rewrite exists (see ``scylla.drafts.export``). These two
classes are the engines' computation written with our building blocks; ``import_export`` reads
an export into them, and ``export_draft`` writes them back unchanged.

- ``ServedEagleDraft`` (EAGLE-1/2, ``LlamaForCausalLMEagle``): ``fc([embed(x); feature]) :
  2H -> H``, then Llama decoder layers of which the first has no input norm (vLLM's and SGLang's
  ``llama_eagle.py`` replace it by the identity), no final norm, read out by the target's LM head
  (the rows of a pruned vocabulary). The feature is the target's post-norm last hidden state.
- ``ServedEagle3Draft`` (EAGLE-3, ``LlamaForCausalLMEagle3``, one layer): the fused feature is
  ``fc(low; mid; high) : 3H -> H`` (the draft's own hidden state of width H passes unchanged);
  the single layer's attention reads ``[input_layernorm(embed(x)); hidden_norm(feature)] : 2H``
  and its residual stream starts from the feature itself; then ``norm`` and the draft's own
  ``lm_head`` over the draft vocabulary. The hidden fed back is the one before ``norm``.

Both share the target's frozen embedding (as the engines do). They are not registered as
training kinds; their saved form is the export itself (``save_pretrained`` writes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scylla.drafts.model import DraftModel, DraftOutput
from scylla.drafts.spec import DraftSpec
from scylla.errors import ConfigError
from scylla.modeling import (MLP, Attention, KVCache, Linear, ModelConfig, RMSNorm,
                             attention_step)


class ServedEagleDraft(DraftModel):
    """EAGLE-1/2 as served: our Scylla draft without the first layer's input norm."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        super().__init__(spec, embed_weight, target_head_weight, d2t)
        self.layers[0].input_layernorm = nn.Identity()

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None,
                        metrics: dict[str, float] | None = None,
                        bench: str | Path | dict[str, Any] | None = None) -> Path:
        """The export itself (``scylla.drafts.export``), with its model card."""
        from scylla.drafts.export import export_draft

        return export_draft(self, path, "eagle", extra, metrics, bench)


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over the 2H concatenation of the normed embedding and
    the normed feature; the residual stream starts from the (un-normed) feature.

    forward(embeds (B, K, H), hidden (B, K, H), step, kv=None) -> (B, K, H)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)  # on the feature
        self.self_attn = Attention(config)
        width = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        self.self_attn.qkv_proj = Linear(2 * h, width, bias=config.attention_bias)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, step: Any,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # 2H
        h = hidden + self.self_attn(x, step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class ServedEagle3Draft(DraftModel):
    """EAGLE-3 as served (one layer); see the module docstring."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        if spec.draft_n_layer != 1:
            raise ConfigError(f"draft_n_layer={spec.draft_n_layer}: the served EAGLE-3 layout "
                              "has exactly one layer (vLLM and SGLang disagree on more)")
        super().__init__(spec, embed_weight, target_head_weight, d2t)
        hidden = spec.target.hidden_size
        self.fc = nn.Linear(len(spec.feature_layers) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(spec.layer_config)])
        self.norm = RMSNorm(hidden, spec.layer_config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, spec.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(target_head_weight)

    def input_feature(self, features: torch.Tensor) -> torch.Tensor:
        """Target features (B, K, 3H) are fused by ``fc``; the draft's own hidden (B, K, H)
        passes (the engines' test: width differs from the embedding's)."""
        features = features.to(self.dtype)
        return features if features.shape[-1] == self.spec.target.hidden_size else self.fc(features)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, compute_logits: bool = True
                ) -> DraftOutput:
        """As ``DraftModel.forward``: input_ids (B, K), features (B, K, F) -> DraftOutput."""
        step = attention_step(self.spec.layer_config, self.rotary, input_ids, cache,
                              position_ids, tree_mask, self.dtype)
        embeds = F.embedding(input_ids, self.embed_weight).to(self.dtype)  # (B, K, H)
        hidden = self.layers[0](embeds, self.input_feature(features), step,
                                cache.layer(0) if cache is not None else None)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return DraftOutput(self.readout(hidden) if compute_logits else None, hidden)

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None,
                        metrics: dict[str, float] | None = None,
                        bench: str | Path | dict[str, Any] | None = None) -> Path:
        """The export itself (``scylla.drafts.export``), with its model card."""
        from scylla.drafts.export import export_draft

        return export_draft(self, path, "eagle3", extra, metrics, bench)


SERVED: dict[str, type[DraftModel]] = {"served-eagle": ServedEagleDraft,
                                       "served-eagle3": ServedEagle3Draft}
