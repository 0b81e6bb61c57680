"""ModelConfig: the few numbers our Llama-family forward needs, read from an HF config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scylla.errors import TargetError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def _rope_from_hf(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    params.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    return float(theta), params


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama, SmolLM2, Qwen2/2.5)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None for plain RoPE, else HF's dict: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", ...}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias covers it too)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise TargetError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TargetError(f"model_type={model_type!r} is not supported by scylla.modeling; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise TargetError(f"hidden_act={hf_config.hidden_act!r} is not supported (only silu)")
        if model_type == "qwen2" and getattr(hf_config, "use_sliding_window", False):
            window = getattr(hf_config, "sliding_window", None)
            if window is not None and window < hf_config.max_position_embeddings:
                raise TargetError(f"use_sliding_window=True with sliding_window={window} is not "
                                  "supported by scylla.modeling (full attention only)")
        theta, scaling = _rope_from_hf(hf_config)
        if scaling is not None and scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise TargetError("rope partial_rotary_factor != 1 is not supported")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        llama_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            # Qwen2 always has q/k/v bias and no o_proj bias; Llama's flag covers all four
            attention_bias=True if model_type == "qwen2" else llama_bias,
            attention_out_bias=False if model_type == "qwen2" else llama_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            eos_token_ids=_as_list(getattr(hf_config, "eos_token_id", None)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
            model_type=model_type,
        )
