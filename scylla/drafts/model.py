"""Draft models: plain ``nn.Module``s that read the frozen target's features.

Both kinds share the EAGLE input: at row position t the draft gets token x_{t+1} and a feature of
position t; the output ``hidden`` at t predicts x_{t+2}. For further draft steps the draft's own
``hidden`` is fed back as the feature.

- ``ScyllaDraft`` (EAGLE-2 style, the paper's draft): the feature is the target's post-norm top
  hidden state, projected with the embedding by ``fc([embed(x); feature]) : 2H -> H`` into
  ``draft_n_layer`` of our ``DecoderLayer``s; ``hidden`` is regressed onto the target's next
  feature and read out by the target's frozen LM head (no norm in between, as the target's
  feature is already normed). With ``head="trained"`` it reads out with its own copy of those
  rows instead, trained with the draft and stored with it.
- ``Eagle3Draft`` (the strongest public baseline), EAGLE-3 exactly as vLLM and SGLang serve it, so
  that ``scylla export --format eagle3`` writes it unchanged: one layer; the feature is the
  target's low / middle / high hidden states fused by ``fc : 3H -> H`` (the draft's own hidden
  of width H passes unfused); the layer's attention reads
  ``[input_layernorm(embed(x)); hidden_norm(feature)] : 2H`` and its residual stream starts from
  the feature itself; ``hidden`` (before the final norm) goes through ``norm`` and its own
  trainable LM head (initialised from the target's).

The embedding and the target's LM head rows are frozen, shared with the target and held as
non-persistent buffers: they are never saved with the draft (``load_draft`` takes them from the
target) and do not count in ``draft_params``. With ``draft_vocab_size > 0`` the draft predicts
over a pruned vocabulary; ``d2t`` maps draft ids to target ids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scylla.data.hidden_states import parse_layers
from scylla.drafts.spec import DraftSpec
from scylla.errors import ConfigError
from scylla.modeling import (
    MLP,
    Attention,
    AttentionStep,
    DecoderLayer,
    ForwardOutput,
    KVCache,
    Linear,
    ModelConfig,
    RMSNorm,
    RotaryEmbedding,
    attention_step,
    kernels,
)
from scylla.modeling.targets import TargetInfo


@dataclass
class DraftOutput:
    logits: torch.Tensor | None  # (B, K, Vd) over the draft vocabulary
    hidden: torch.Tensor  # (B, K, H) the draft's feature (fed back for the next draft step)


class DraftModel(nn.Module):
    """Shared body of the drafts; see the module docstring. Build one with
    ``instantiate(draft_spec(...), target, d2t)`` or ``load_draft(path, target)``."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        hidden = spec.target.hidden_size
        self.register_buffer("embed_weight", embed_weight, persistent=False)  # (V, H) frozen
        # the target's LM head rows of the draft vocabulary: (Vd, H), frozen
        self.register_buffer("target_head_weight", target_head_weight, persistent=False)
        # the head is nearly all of a draft step's cost on a CPU: it takes the target's GEMM
        # seam (scylla.modeling.kernels), with layouts of its own
        self._head_copies = kernels.WeightCopies()
        self.register_buffer("d2t", d2t)  # (Vd,) draft id -> target id, or None
        self.fc = Linear(2 * hidden, hidden, bias=True)  # the layers' CPU GEMM path
        self.layers = nn.ModuleList(DecoderLayer(spec.layer_config, i)
                                    for i in range(spec.draft_n_layer))
        self.rotary = RotaryEmbedding(spec.layer_config)

    def init_for_training(self) -> None:
        """Adjust the freshly built weights of a draft about to be trained (default: none).
        ``instantiate`` alone keeps every weight random, which the tests of caches and masks
        need."""

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.spec.feature_layers

    @property
    def draft_params(self) -> int:
        """Trainable parameters (the capacity axis next to ``draft_n_layer``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def features(self, target_out: ForwardOutput) -> torch.Tensor:
        """What the draft consumes from a target forward: (B, K, F)."""
        if not self.feature_layers:
            return target_out.last_hidden
        missing = [i for i in self.feature_layers if i not in target_out.hidden]
        if missing:
            raise ConfigError(f"target forward lacks hidden layers {missing}; call it with "
                              f"hidden_layers={self.feature_layers}")
        return torch.cat([target_out.hidden[i] for i in self.feature_layers], dim=-1)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.spec.layer_config
        return KVCache(self.spec.draft_n_layer, batch_size, c.num_key_value_heads, max_len,
                       c.head_dim, self.fc.weight.device, self.dtype)

    def input_feature(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, F) -> (B, K, H); the identity for the Scylla draft."""
        return features.to(self.dtype)

    def project(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(input_ids, self.embed_weight).to(self.dtype)  # (B, K, H)
        return self.fc(torch.cat([emb, self.input_feature(features)], dim=-1))

    def body(self, input_ids: torch.Tensor, features: torch.Tensor, step: AttentionStep,
             kvs: list[Any]) -> torch.Tensor:
        """hidden (B, K, H) of input_ids (B, K) and features (B, K, F); kvs[i]: layer i's key /
        value buffers (a cache layer, the unrolled training buffers) or None."""
        x = self.project(input_ids, features)
        for layer, kv in zip(self.layers, kvs):
            x = layer(x, step, kv)
        return x

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits (B, K, Vd) from the draft's hidden (B, K, H)."""
        return kernels.linear(hidden, self.target_head_weight.to(hidden.dtype), None,
                              self._head_copies)

    def target_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """The target's logits over the draft vocabulary from its post-norm feature (B, K, H)."""
        return F.linear(last_hidden.to(self.dtype), self.target_head_weight.to(self.dtype))

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, compute_logits: bool = True
                ) -> DraftOutput:
        """input_ids (B, K) target-vocabulary ids, features (B, K, F) -> DraftOutput.

        Cache, position ids and tree mask behave as in ``LlamaFamilyModel.forward``.
        compute_logits=False skips the LM head (logits None): decoding's prefill and catch-up
        need logits at one position only and call ``readout`` on that hidden state.
        """
        step = attention_step(self.spec.layer_config, self.rotary, input_ids, cache,
                              position_ids, tree_mask, self.dtype)
        kvs = [cache.layer(i) if cache is not None else None for i in range(len(self.layers))]
        hidden = self.body(input_ids, features, step, kvs)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return DraftOutput(self.readout(hidden) if compute_logits else None, hidden)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.d2t is None else self.d2t[draft_ids]


class ScyllaDraft(DraftModel):
    """EAGLE-2-style draft with ``draft_n_layer`` layers, read out by the target's LM head (or,
    ``spec.head == "trained"``, by a trainable copy of its rows)."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        super().__init__(spec, embed_weight, target_head_weight, d2t)
        self.lm_head = None
        if spec.head == "trained":
            self.lm_head = Linear(spec.target.hidden_size, spec.vocab_size, bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(target_head_weight)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().readout(hidden) if self.lm_head is None else self.lm_head(hidden)

    def init_for_training(self) -> None:
        """Zero every layer's residual-branch output (attention ``o_proj``, MLP ``down_proj``):
        training then starts from ``fc`` alone at any depth, and the zeroed weights still get
        gradients. With PyTorch's default init the random layers drown the projected feature:
        on SmolLM2-135M-Instruct + ShareGPT, 125k tokens, seed 0, 8 layers reached
        val/tau_chain 1.125 with it and 1.191 with zeroed branches (1 layer: 1.179, 1.167)."""
        for layer in self.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                nn.init.zeros_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)


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

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, step: AttentionStep,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # 2H
        h = hidden + self.self_attn(x, step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(DraftModel):
    """EAGLE-3 draft (one layer) as the engines serve it; see the module docstring."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor,
                 target_head_weight: torch.Tensor, d2t: torch.Tensor | None):
        if spec.draft_n_layer != 1:
            raise ConfigError(f"draft_n_layer={spec.draft_n_layer}: an eagle3 draft has exactly "
                              "one layer (vLLM and SGLang disagree on how to serve more)")
        super().__init__(spec, embed_weight, target_head_weight, d2t)
        hidden = spec.target.hidden_size
        self.fc = Linear(len(spec.feature_layers) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(spec.layer_config)])
        self.norm = RMSNorm(hidden, spec.layer_config.rms_norm_eps)
        self.lm_head = Linear(hidden, spec.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(target_head_weight)

    def input_feature(self, features: torch.Tensor) -> torch.Tensor:
        """Target features (B, K, 3H) are fused by ``fc``; the draft's own hidden (B, K, H)
        passes (the engines' rule: fuse when the width differs from the embedding's)."""
        hidden = self.spec.target.hidden_size
        features = features.to(self.dtype)
        if features.shape[-1] == hidden:
            return features
        if features.shape[-1] != self.fc.in_features:
            raise ConfigError(f"eagle3 draft expects features of width {self.fc.in_features} "
                              f"(layers {self.feature_layers}) or {hidden}, got "
                              f"{features.shape[-1]}")
        return self.fc(features)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def body(self, input_ids: torch.Tensor, features: torch.Tensor, step: AttentionStep,
             kvs: list[Any]) -> torch.Tensor:
        embeds = F.embedding(input_ids, self.embed_weight).to(self.dtype)  # (B, K, H)
        return self.layers[0](embeds, self.input_feature(features), step, kvs[0])


KINDS: dict[str, type[DraftModel]] = {"scylla": ScyllaDraft, "eagle3": Eagle3Draft}


def draft_spec(kind: str, draft_n_layer: int, target: Any, draft_vocab_size: int = 0,
               feature_layers: str = "", extra: dict[str, Any] | None = None,
               head: str = "target") -> DraftSpec:
    """The spec of a new draft for ``target`` (a ``Target`` or anything with .name, .model)."""
    if kind not in KINDS:
        raise ConfigError(f"DraftConfig.kind={kind!r}: one of {tuple(KINDS)}")
    if head != "target" and kind != "scylla":
        raise ConfigError(f"DraftConfig.head={head!r}: only a scylla draft has a choice of head")
    info = TargetInfo.of(target)
    layer_config = dataclasses.replace(target.model.config, num_hidden_layers=draft_n_layer)
    layers = parse_layers(feature_layers, info.num_hidden_layers) if kind == "eagle3" else ()
    return DraftSpec(kind=kind, draft_n_layer=draft_n_layer, target=info,
                     layer_config=layer_config, feature_layers=layers,
                     draft_vocab_size=draft_vocab_size, head=head, extra=dict(extra or {}))


def instantiate(spec: DraftSpec, target: Any, d2t: torch.Tensor | None = None,
                cls: type[DraftModel] | None = None) -> DraftModel:
    """A draft for ``spec`` wired to the frozen embedding / LM head of ``target``; ``cls``
    overrides the class of ``spec.kind`` (the served layouts of ``scylla.drafts.served``)."""
    spec.check_target(target)
    model = target.model
    if spec.draft_vocab_size:
        if d2t is None or d2t.shape != (spec.draft_vocab_size,):
            raise ConfigError(f"draft_vocab_size={spec.draft_vocab_size} needs a d2t map of that "
                              "many target ids (see scylla.drafts.vocab.build_d2t)")
        d2t = d2t.to(device=model.lm_head.weight.device, dtype=torch.long)
        head = model.lm_head.weight.detach().index_select(0, d2t)  # (Vd, H) copy
    else:
        d2t = None
        head = model.lm_head.weight.detach()  # (V, H) shared with the target
    draft = (cls or KINDS[spec.kind])(spec, model.embed_tokens.weight.detach(), head, d2t)
    return draft.to(device=head.device)
