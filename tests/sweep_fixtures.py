"""A tiny sweep file for the tests that run a whole (simulated) sweep: one hidden-state
build, 3 training budgets, 2 decode batch sizes x 2 methods, one fit."""

TINY = """
name: tiny
profiles:
  quick:
    hidden_states: {params: {build_tokens: 4000}}
    train:
      params: {draft_n_layer: 1}
      grid: {train_tokens: [1000, 2000, 4000]}
    decode:
      params: {methods: "plain,tree"}
      grid: {decode_batch_size: [1, 2]}
    fits:
      - {name: tau, stage: train, x: train_tokens, y: val/tau_chain}
"""
