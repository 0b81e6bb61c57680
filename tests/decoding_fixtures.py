"""Tiny targets and drafts for the decoding tests (no hub, no files).

- ``tiny_target``: a random Llama whose larger init (0.3 instead of HF's 0.02) spreads its
  logits, so greedy outputs differ by prompt and numerical near-ties are rare.
- ``random_draft``: an untrained draft of the real ``scylla.drafts`` classes: almost every
  proposal is rejected (the rejection paths).
- ``OracleDraft``: proposes what the target itself would say after the node's path, so whole
  trees get accepted (long acceptance paths); ``noise`` > 0 perturbs its logits so acceptance
  is partial and branches beyond rank 0 matter. The noise is a function of the context alone,
  so a row's proposals never depend on the rest of the batch. It keeps the token ids it
  consumed in a real ``KVCache`` (one layer, one head, head_dim 1), so every cache operation the
  engine does (set_lengths, select, put) keeps them right, and recomputes each node's context
  from them.
  The draft never sees the first prompt token (EAGLE shift), so test prompts start with BOS.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from scylla.drafts.model import draft_spec, instantiate
from scylla.modeling import ForwardOutput, KVCache, LlamaFamilyModel

BOS, EOS = 1, 2


def tiny_target(vocab: int = 96, seed: int = 0, hidden: int = 64, init: float = 0.3,
                name: str = "tiny") -> SimpleNamespace:
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=init, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)).eval()
    model = LlamaFamilyModel.from_hf(hf)
    return SimpleNamespace(name=name, model=model, eos_token_ids=[EOS], tokenizer=None,
                           device=model.device, dtype=model.dtype)


def random_draft(target, kind: str = "scylla", seed: int = 1, d2t: torch.Tensor | None = None):
    torch.manual_seed(seed)
    spec = draft_spec(kind, 1, target, draft_vocab_size=0 if d2t is None else len(d2t))
    return instantiate(spec, target, d2t).eval()


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


class OracleDraft(nn.Module):
    feature_layers: tuple[int, ...] = ()
    d2t = None

    def __init__(self, target, noise: float = 0.0):
        super().__init__()
        self.model = target.model
        self.noise = noise

    def features(self, target_out: ForwardOutput) -> torch.Tensor:
        return target_out.last_hidden

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(1, batch_size, 1, max_len, 1, self.model.device, torch.float32)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # the oracle's hidden state is its logits

    def forward(self, input_ids, features, cache=None, position_ids=None, tree_mask=None,
                compute_logits=True):
        batch, k = input_ids.shape
        stored = cache.k[0, :, 0, :, 0]  # (B, max_len) token ids consumed so far
        lengths = cache.lengths.tolist()
        width = k if tree_mask is None else tree_mask.shape[-1]
        window = width - k
        contexts = []
        for b in range(batch):
            for i in range(k):
                if tree_mask is None:
                    seen = [True] * (i + 1) + [False] * (k - i - 1)
                    seen_win = []
                else:
                    row = tree_mask[b, i].tolist()
                    seen_win, seen = row[:window], row[window:]
                    seen[i] = True
                start = lengths[b] - window
                ctx = [BOS] + stored[b, :start].long().tolist()
                ctx += [int(stored[b, start + j]) for j, s in enumerate(seen_win) if s]
                ctx += [int(input_ids[b, j]) for j, s in enumerate(seen) if s]
                contexts.append(ctx)
        for b in range(batch):
            n = lengths[b]
            stored[b, n:n + k] = input_ids[b].to(stored.dtype)
        cache.advance(k)
        logits = self._next_logits(contexts)  # (B * K, V)
        if self.noise:
            logits = logits + self.noise * torch.stack([
                torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(
                    hash(tuple(c)) % 2**31)) for c in contexts])
        logits = logits.view(batch, k, -1)
        return SimpleNamespace(logits=logits if compute_logits else None, hidden=logits)

    def _next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """The target's logits after each context: one right-padded cache-less forward."""
        width = max(len(c) for c in contexts)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in contexts])
        out = self.model(ids).logits  # (M, T, V), causal: padding is never attended
        last = torch.tensor([len(c) - 1 for c in contexts])
        return out[torch.arange(len(contexts)), last]
