"""RMSNorm, SwiGLU MLP, GQA attention and the decoder layer of a Llama-family model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scylla.modeling.attention import AttentionStep
from scylla.modeling.config import ModelConfig
from scylla.modeling.rope import apply_rope


class Linear(nn.Linear):
    """nn.Linear that multiplies a few rows by a transposed (in, out) copy of its weight on CPU.

    For one to a few rows (decoding steps, draft steps) a matmul against the (in, out) layout
    streams the weight row by row and runs ~1.35x faster on CPU than against nn.Linear's
    (out, in) layout (measured on SmolLM2's shapes at one row: 38 vs 52 ms per forward). At
    four rows it is slower: a 4-token forward of SmolLM2 on a 256-token cache took 114 ms with
    the copy and 61 ms without (2 threads), hence the cut-off at three rows. The copy is built on first use, rebuilt
    when the weight changes (new storage or in-place update), and never used when autograd
    records the product. ``transposed_copy = False`` turns it off (saves its memory).
    """

    COPY_MAX_ROWS = 3

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.transposed_copy = True
        self._copy_max_numel = self.COPY_MAX_ROWS * in_features
        self._wt: torch.Tensor | None = None
        self._wt_key: tuple[int, int] = (0, -1)

    def _cpu_inference(self, x: torch.Tensor) -> bool:
        """A CPU product autograd does not record: the layouts below may be chosen freely."""
        w = self.weight
        return w.is_cpu and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.numel() <= self._copy_max_numel and self.transposed_copy and self._cpu_inference(x):
            key = (w.data_ptr(), -1 if w.is_inference() else w._version)
            if key != self._wt_key:
                self._wt, self._wt_key = w.detach().t().contiguous(), key
            y = torch.matmul(x, self._wt)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


class LMHead(Linear):
    """The vocabulary projection (V, H): for 2 to 16 rows on CPU it multiplies weight @ x.T and
    returns the transposed view, which streams the large (V, H) weight once at full speed:
    4-8 rows cost 5-7 ms instead of 17-20 ms for SmolLM2's 49k x 576 head with 2 threads
    (measured; at one row Linear's transposed copy is faster, past 16 rows the kernels meet)."""

    WIDE_MAX_ROWS = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 1 < rows <= self.WIDE_MAX_ROWS and self._cpu_inference(x):
            y = (self.weight @ x.reshape(rows, self.in_features).t()).t()  # (rows, V) view
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            else:
                k_cache.scatter_(2, step.write_idx, k_new)
                v_cache.scatter_(2, step.write_idx, v_new)
            keys, values = k_cache.narrow(2, 0, step.key_len), v_cache.narrow(2, 0, step.key_len)
        if step.causal and heads != n_kv:
            # SDPA's causal flag cannot see the folded rows: spell the mask out
            causal = torch.ones(n_new, n_new, dtype=torch.bool, device=x.device).tril()
            mask = causal.repeat(heads // n_kv, 1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask,
                                                 is_causal=step.causal)
        # (B, Hkv, g*K, D) -> (B, K, Hq*D) with heads in HF order (kv head major)
        out = out.reshape(batch, heads, n_new, dim).transpose(1, 2)
        return self.o_proj(out.reshape(batch, n_new, heads * dim))


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

    def forward(self, x: torch.Tensor, step: AttentionStep,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))
