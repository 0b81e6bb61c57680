"""Our own compact Llama-family forward (Llama, SmolLM2, Qwen2/2.5) for speculative decoding.

A static KV cache with per-row lengths, appending K tokens at once under an arbitrary tree mask
with explicit position ids, keeping any subset of them per row, and chosen layers' hidden states
next to the logits. HF transformers is the reference the tests compare with.
"""
from scylla.modeling.attention import AttentionStep, attention_step
from scylla.modeling.cache import KVCache
from scylla.modeling.config import ModelConfig
from scylla.modeling.layers import MLP, Attention, DecoderLayer, Linear, RMSNorm
from scylla.modeling.model import ForwardOutput, LlamaFamilyModel
from scylla.modeling.rope import RotaryEmbedding, apply_rope, rope_inv_freq

__all__ = [
    "Attention", "AttentionStep", "DecoderLayer", "ForwardOutput", "KVCache", "LlamaFamilyModel",
    "Linear", "MLP", "ModelConfig", "RMSNorm", "RotaryEmbedding", "apply_rope", "attention_step",
    "rope_inv_freq",
]
