"""LlamaFamilyModel: our forward over a pre-allocated KV cache, with weights taken from HF."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from scylla.errors import TargetError
from scylla.modeling.attention import attention_step
from scylla.modeling.cache import KVCache
from scylla.modeling.config import ModelConfig
from scylla.modeling.layers import DecoderLayer, LMHead, RMSNorm
from scylla.modeling.rope import RotaryEmbedding


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # (B, K, V), None when compute_logits=False
    last_hidden: torch.Tensor  # (B, K, H) after the final norm (EAGLE's feature)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> (B, K, H)


class LlamaFamilyModel(nn.Module):
    """Llama / SmolLM2 / Qwen2 decoder with a static KV cache, tree masks and hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len,
                       c.head_dim, self.device, self.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                hidden_layers: Iterable[int] = (), compute_logits: bool = True) -> ForwardOutput:
        """Append input_ids (B, K) to each row of ``cache`` (or run a cache-less forward).

        position_ids (B, K): default cache.lengths[:, None] + arange(K) (0.. without a cache).
        tree_mask (B, K, K) or (K, K) bool: new token i may attend new token j (default causal;
        the diagonal is always visible). Cached entries [0, lengths[b]) are always visible,
        except with a (B, K, W + K) mask, whose first W columns mask the W cached entries just
        before lengths[b] (a draft's earlier tree levels).
        hidden_layers: HF hidden_states indices; 0 = embeddings, i = output of decoder layer i
        before the final norm (also for i = L, unlike HF whose last entry is normed: use
        ``last_hidden`` for that). With a cache, new K/V go to lengths[b] .. lengths[b]+K-1 and
        lengths grow by K.
        """
        wanted = set(hidden_layers)
        step = attention_step(self.config, self.rotary, input_ids, cache, position_ids,
                              tree_mask, self.dtype)
        x = self.embed_tokens(input_ids)  # (B, K, H)
        hidden = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache.layer(i) if cache is not None else None)
            if i + 1 in wanted:
                hidden[i + 1] = x
        if cache is not None:
            cache.advance(input_ids.shape[1])
        last = self.norm(x)
        logits = self.lm_head(last) if compute_logits else None
        return ForwardOutput(logits, last, hidden)

    @classmethod
    def from_hf(cls, hf_model: Any) -> "LlamaFamilyModel":
        """Copy the weights of an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``."""
        config = ModelConfig.from_hf(hf_model.config)
        gen = getattr(hf_model, "generation_config", None)
        for eos in _eos_list(getattr(gen, "eos_token_id", None)):
            if eos not in config.eos_token_ids:
                config.eos_token_ids.append(eos)
        src = hf_model.state_dict()
        ref = src["model.embed_tokens.weight"]
        # plain tensors even when called under inference_mode: drafts train against them
        with torch.inference_mode(False), torch.no_grad():
            with torch.device("meta"):
                model = cls(config)
            model = model.to_empty(device=ref.device).to(ref.dtype)
            if config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            for name, tensor in _our_state_dict(src, config).items():
                model.get_parameter(name).copy_(tensor)
        return model.eval()


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _our_state_dict(src: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF parameter names -> ours (q/k/v and gate/up concatenated along the output rows)."""

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise TargetError(f"HF checkpoint has no tensor {name!r}")
        return src[name]

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"),
           "norm.weight": take("model.norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        out[ours + "self_attn.qkv_proj.weight"] = torch.cat(
            [take(attn + p + "_proj.weight") for p in "qkv"])
        if config.attention_bias:
            out[ours + "self_attn.qkv_proj.bias"] = torch.cat(
                [take(attn + p + "_proj.bias") for p in "qkv"])
        out[ours + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if config.attention_out_bias:
            out[ours + "self_attn.o_proj.bias"] = take(attn + "o_proj.bias")
        mlp = hf + "mlp."
        out[ours + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        out[ours + "mlp.down_proj.weight"] = take(mlp + "down_proj.weight")
        if config.mlp_bias:
            out[ours + "mlp.gate_up_proj.bias"] = torch.cat(
                [take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
            out[ours + "mlp.down_proj.bias"] = take(mlp + "down_proj.bias")
        out[ours + "input_layernorm.weight"] = take(hf + "input_layernorm.weight")
        out[ours + "post_attention_layernorm.weight"] = take(hf + "post_attention_layernorm.weight")
    return out
