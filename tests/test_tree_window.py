"""The window form of tree masks: feeding a tree level by level, each level masking the earlier
levels' cache entries to its own ancestors, equals one forward of the whole tree."""
from __future__ import annotations

import torch
from decoding_fixtures import tiny_target

from scylla.decoding.tree import ancestor_mask


@torch.inference_mode()
def test_level_by_level_equals_whole_tree():
    model = tiny_target(64).model
    ctx = torch.randint(3, 64, (2, 7))
    # level 1: nodes 0, 1, 2 (children of the context's end); level 2: 3 <- 0, 4 <- 2, 5 <- 0
    parents = torch.tensor([-1, -1, -1, 0, 2, 0])
    tokens = torch.randint(3, 64, (2, 6))
    depth = torch.tensor([0, 0, 0, 1, 1, 1])

    whole_cache = model.new_cache(2, 32)
    model(ctx, cache=whole_cache)
    whole_cache.set_lengths([7, 5])  # ragged rows: row 1's context is shorter
    lengths = whole_cache.lengths.clone()
    mask = ancestor_mask(parents.expand(2, -1), 1)
    whole = model(tokens, cache=whole_cache, position_ids=lengths[:, None] + depth,
                  tree_mask=mask).logits

    cache = model.new_cache(2, 32)
    model(ctx, cache=cache)
    cache.set_lengths([7, 5])
    first = model(tokens[:, :3], cache=cache, position_ids=lengths[:, None].expand(-1, 3),
                  tree_mask=torch.eye(3, dtype=torch.bool).expand(2, -1, -1)).logits
    window = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)  # (3 new, W=3)
    tree_mask = torch.cat([window, torch.eye(3, dtype=torch.bool)], 1).expand(2, -1, -1)
    second = model(tokens[:, 3:], cache=cache, position_ids=(lengths + 1)[:, None].expand(-1, 3),
                   tree_mask=tree_mask).logits
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=0)
    # without the window the level-2 nodes would also see their non-ancestors
    leaky = model.new_cache(2, 32)
    model(ctx, cache=leaky)
    leaky.set_lengths([7, 5])
    model(tokens[:, :3], cache=leaky, position_ids=lengths[:, None].expand(-1, 3),
          tree_mask=torch.eye(3, dtype=torch.bool).expand(2, -1, -1))
    wrong = model(tokens[:, 3:], cache=leaky, position_ids=(lengths + 1)[:, None].expand(-1, 3),
                  tree_mask=torch.eye(3, dtype=torch.bool).expand(2, -1, -1)).logits
    assert (wrong - whole[:, 3:]).abs().max() > 1e-2
