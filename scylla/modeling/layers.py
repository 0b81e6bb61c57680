"""RMSNorm, SwiGLU MLP, GQA attention and the decoder layer of a Llama-family model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scylla.modeling import kernels
from scylla.modeling.attention import AttentionStep
from scylla.modeling.config import ModelConfig
from scylla.modeling.rope import apply_rope


class Linear(nn.Linear):
    """nn.Linear whose CPU inference products go through ``scylla.modeling.kernels``.

    The seam picks the GEMM path per shape (for fp32 a transposed copy for one row, oneDNN
    prepacked weights for more); CUDA, autograd and other dtypes use ``F.linear``. Derived
    weight layouts are built on first use, rebuilt when the weight changes (new storage or
    in-place update) and dropped by ``release_weight_copies``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._copies = kernels.WeightCopies()

    def release_weight_copies(self) -> None:
        """Free the packed / transposed copy (it is rebuilt on the next inference product)."""
        self._copies.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self._copies)


class LMHead(Linear):
    """The vocabulary projection (V, H), tied or not: the same seam as every layer, so a verify
    forward's logits are row for row those of a plain decoding step."""


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.rms_norm(x, self.weight, self.eps)  # fp32 CPU inference, one pass
        if fused is not None:
            return fused
        if x.dtype == torch.float32 and not (torch.is_grad_enabled() and (
                x.requires_grad or self.weight.requires_grad)):
            # fp32 inference: one fused kernel instead of eight small ops (61 norms per
            # SmolLM2 forward); it normalises each row alone, as the ops below do
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # mean(x^2) as |x|^2 / H: on CPU one norm kernel costs a third of pow + mean
        h = x.float()  # low precision is normalised in fp32, rounded, then scaled (as in HF)
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        if torch.is_grad_enabled() and h.requires_grad:
            # training (drafts): autograd keeps the norm for backward, so no in-place ops
            scale = (norm.square() * (1.0 / h.shape[-1]) + self.eps).rsqrt()
        else:
            scale = norm.square_().mul_(1.0 / h.shape[-1]).add_(self.eps).rsqrt_()
        return self.weight * (h * scale).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU; gate and up projections fused into one matmul (rows [gate; up])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size,
                                   bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size,
                                bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        n = self.intermediate_size
        return self.down_proj(F.silu(gate_up.narrow(-1, 0, n)) * gate_up.narrow(-1, n, n))


class Attention(nn.Module):
    """GQA self-attention; q, k, v projections fused into one matmul (rows [q; k; v])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj = Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                               bias=config.attention_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size,
                             bias=config.attention_out_bias)

    def forward(self, x: torch.Tensor, step: AttentionStep,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, n_new, _ = x.shape
        heads, n_kv, dim = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).view(batch, n_new, heads + 2 * n_kv, dim)  # (B, K, Hq+2Hkv, D)
        # (narrow rather than [] slicing: these run 30x per token and narrow costs half)
        qk = apply_rope(qkv.narrow(2, 0, heads + n_kv), step.cos, step.sin)  # (B, K, Hq+Hkv, D)
        # fold the g query heads of each kv head into its query rows: (B, Hkv, g*K, D)
        q = qk.narrow(2, 0, heads).transpose(1, 2).reshape(batch, n_kv, -1, dim)
        k_new = qk.narrow(2, heads, n_kv).transpose(1, 2)  # (B, Hkv, K, D)
        v_new = qkv.narrow(2, heads + n_kv, n_kv).transpose(1, 2)
        if kv is None:
            keys, values = k_new, v_new
        else:
            k_cache, v_cache = kv  # (B, Hkv, max_len, D)
            if step.write_at is not None:
                k_cache.narrow(2, step.write_at, n_new).copy_(k_new)
                v_cache.narrow(2, step.write_at, n_new).copy_(v_new)
            else:  # each row at its own length
                idx = step.write_pos[:, None, :, None].expand_as(k_new)
                k_cache.scatter_(2, idx, k_new)
                v_cache.scatter_(2, idx, v_new)
            keys, values = k_cache.narrow(2, 0, step.key_len), v_cache.narrow(2, 0, step.key_len)
        out = None
        if kv is not None and n_new <= kernels.ROWS_MAX:  # a decode step: the fp32 CPU kernel
            out = kernels.attend(q, keys, values, step.mask)
        if out is None:
            out = self._sdpa(q, keys, values, step)
        # (B, Hkv, g*K, D) -> (B, K, Hq*D) with heads in HF order (kv head major)
        out = out.reshape(batch, heads, n_new, dim).transpose(1, 2)
        return self.o_proj(out.reshape(batch, n_new, heads * dim))

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              step: AttentionStep) -> torch.Tensor:
        if step.causal and self.n_heads != self.n_kv:
            # SDPA's causal flag cannot see the folded rows: spell the mask out
            causal = torch.ones(step.n_new, step.n_new, dtype=torch.bool, device=q.device).tril()
            mask = causal.repeat(self.n_heads // self.n_kv, 1)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask,
                                              is_causal=step.causal)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)).

    forward(x (B, K, H), step: AttentionStep, kv=None) -> (B, K, H). ``step`` comes from
    ``scylla.modeling.attention_step`` (position ids -> rotary cos/sin, cache write position,
    mask); ``kv`` is this layer's ``cache.layer(i)`` or None for a cache-less forward. Whoever
    runs the layers calls ``cache.advance(K)`` once after the last one.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self._step = kernels.LayerStep(self._step_weights, config.num_attention_heads)

    def _step_weights(self) -> tuple | None:
        """What ``kernels.LayerStep`` runs: the norms and the projections (None where the input
        norm is not an RMSNorm, as in a served EAGLE draft's first layer)."""
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if not all(isinstance(n, RMSNorm) for n in norms):
            return None
        attn, mlp = self.self_attn, self.mlp
        return norms, tuple((m.weight, m.bias, m._copies) for m in (
            attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))

    def forward(self, x: torch.Tensor, step: AttentionStep,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if kv is not None and step.write_pos is not None:  # a decode step: one kernel call
            fused = self._step(x, step.cos, step.sin, kv, step.write_pos, step.key_len,
                               step.mask)
            if fused is not None:
                return fused
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))
