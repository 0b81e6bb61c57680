"""Property tests of the tree machinery: random trees, random acceptance patterns.

- the greedy verifier against a plain Python walk of the tree;
- the dynamic (EAGLE-2) tree builder against a direct per-row re-implementation, with a draft
  whose logits are a function of exactly what it may attend to (so a wrong window mask changes
  the tree);
- static trees: the built nodes are exactly the branch choices;
- the whole engine fed random trees (random shapes, depths, padding, right and wrong tokens)
  still emits plain greedy decoding's tokens.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from decoding_fixtures import prompts_of, tiny_target

from scylla.decoding.engine import Decoder
from scylla.decoding.expand import DraftRoot, dynamic_shape, expand, static_shape
from scylla.decoding.plain import plain_decode
from scylla.decoding.tree import Tree, ancestor_mask, chain, parse_static_tree
from scylla.decoding.verify import verify_greedy
from scylla.errors import ConfigError
from scylla.modeling import KVCache


def random_tree(rng: random.Random, n: int, vocab: int, pad: int = 0) -> dict:
    """Parents before children; ``pad`` padding nodes (parent 0, depth 1, invalid) at the end."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        p = rng.randrange(i)
        parents.append(p)
        depth.append(depth[p] + 1)
    parents += [0] * pad
    depth += [1] * pad
    tokens = [rng.randrange(vocab) for _ in parents]
    return dict(parents=parents, depth=depth, tokens=tokens, valid=[True] * n + [False] * pad)


def stack(trees: list[dict]) -> Tree:
    t = {k: torch.tensor([tr[k] for tr in trees]) for k in trees[0]}
    return Tree(t["tokens"], t["parents"], t["depth"], t["valid"], int(t["depth"].max()))


def reference_walk(tr: dict, pred: list[int]) -> list[int]:
    """Emitted tokens: a child is accepted when its parent is and its token is the target's
    argmax at the parent; the deepest accepted node (first by index on ties) ends the path."""
    accepted = [True]
    for i in range(1, len(tr["parents"])):
        p = tr["parents"][i]
        accepted.append(tr["valid"][i] and accepted[p] and tr["tokens"][i] == pred[p])
    best = max((i for i, a in enumerate(accepted) if a), key=lambda i: (tr["depth"][i], -i))
    path = [best]
    while path[-1] > 0:
        path.append(tr["parents"][path[-1]])
    return [pred[i] for i in reversed(path)]


def test_greedy_verifier_matches_a_python_walk():
    rng = random.Random(0)
    vocab = 4  # tiny, so right guesses (and right-token padding) are frequent
    for _ in range(200):
        batch, n, pad = rng.randint(1, 5), rng.randint(1, 12), rng.randint(0, 3)
        trees = [random_tree(rng, n, vocab, pad) for _ in range(batch)]
        tree = stack(trees)
        logits = torch.randn(batch, tree.size, vocab)
        mask = tree.ancestors()
        v = verify_greedy(tree, logits, mask)
        pred = logits.argmax(-1).tolist()
        for b, tr in enumerate(trees):
            want = reference_walk(tr, pred[b])
            c = int(v.count[b])
            assert v.tokens[b, :c].tolist() == want
            path = v.keep_idx[b, :c].tolist()
            assert path[0] == 0 and all(tr["parents"][x] == y for y, x in zip(path, path[1:]))
            assert v.accepted[b].sum() == c - 1


def test_ancestor_mask_and_chain():
    rng = random.Random(1)
    for _ in range(50):
        tr = random_tree(rng, rng.randint(1, 15), 5, rng.randint(0, 2))
        mask = ancestor_mask(torch.tensor([tr["parents"]]), max(tr["depth"]))[0]
        for i in range(len(tr["parents"])):
            anc, j = {i}, tr["parents"][i]
            while j >= 0:
                anc.add(j)
                j = tr["parents"][j]
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == anc
    t = chain(torch.tensor([[7, 1, 2, 3], [8, 4, 5, 6]]), torch.tensor([3, 1]))
    assert t.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert t.parents[0].tolist() == [-1, 0, 1, 2] and t.parents[1].tolist() == [-1, 0, 0, 0]


class ContextDraft:
    """Logits that are a hash of exactly the tokens the node may attend to (context from its
    cache, window entries the mask shows, new tokens the mask shows), so the tree it grows is
    reproducible from paths alone: any masking error changes the tree."""

    feature_layers = ()
    d2t = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(1, batch, 1, max_len, 1, torch.device("cpu"), torch.float32)

    def logits_of(self, seen: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(self.vocab, generator=torch.Generator().manual_seed(hash(seen) % 2**31))

    def __call__(self, input_ids, features, cache, position_ids=None, tree_mask=None,
                 compute_logits=True):
        batch, k = input_ids.shape
        stored = cache.k[0, :, 0, :, 0]
        window = tree_mask.shape[-1] - k
        out = []
        for b in range(batch):
            n = int(cache.lengths[b])
            for i in range(k):
                row = tree_mask[b, i].tolist()
                seen = stored[b, :n - window].long().tolist()
                seen += [int(stored[b, n - window + j]) for j in range(window) if row[j]]
                seen += [int(input_ids[b, j]) for j in range(k) if row[window + j] or j == i]
                out.append(self.logits_of(tuple(seen)))
            stored[b, n:n + k] = input_ids[b].float()
        cache.advance(k)
        return SimpleNamespace(logits=torch.stack(out).view(batch, k, -1),
                               hidden=torch.zeros(batch, k, 1))


def reference_dynamic(draft: ContextDraft, context: list[int], root_logits: torch.Tensor,
                      k: int, depth: int, total: int) -> set[tuple[int, ...]]:
    """EAGLE-2 for one row: paths (token tuples) of the selected nodes."""
    def children(path, score, logits):
        lp = torch.log_softmax(logits, -1).topk(k)
        return [(path + (int(t),), score + float(s)) for t, s in zip(lp.indices, lp.values)]

    level = children((), 0.0, root_logits)
    nodes = list(level)
    for _ in range(depth - 1):
        frontier = sorted(level, key=lambda x: -x[1])[:k]
        level = [c for path, score in frontier
                 for c in children(path, score, draft.logits_of(tuple(context) + path))]
        nodes += level
    return {p for p, _ in sorted(nodes, key=lambda x: -x[1])[:total]}


def paths_of(tree: Tree, b: int) -> set[tuple[int, ...]]:
    out = set()
    for i in range(1, tree.size):
        path, j = [], i
        while j > 0:
            path.append(int(tree.tokens[b, j]))
            j = int(tree.parents[b, j])
        out.add(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("k,depth,total", [(1, 4, 4), (2, 3, 7), (3, 4, 12), (4, 2, 30)])
def test_dynamic_tree_matches_eagle2_reference(k, depth, total):
    vocab, batch = 11, 3
    draft = ContextDraft(vocab)
    rng = random.Random(k * 100 + depth)
    lengths = [rng.randint(1, 6) for _ in range(batch)]
    cache = draft.new_cache(batch, 64)
    contexts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    for b, ctx in enumerate(contexts):
        cache.k[0, b, 0, :len(ctx), 0] = torch.tensor(ctx, dtype=torch.float32)
    cache.set_lengths(lengths)
    root_logits = torch.randn(batch, vocab)
    root = DraftRoot(root_logits, torch.zeros(batch, 1))
    shape = dynamic_shape(k, depth, total)
    tree, cands, feeds = expand(draft, cache, root, torch.zeros(batch, dtype=torch.long),
                                torch.tensor(lengths), shape, 0.0, 1.0, vocab)
    assert cands is None and feeds == depth - 1
    assert cache.lengths.tolist() == lengths  # the tree entries were dropped again
    assert tree.size == 1 + shape.total
    for b in range(batch):
        want = reference_dynamic(draft, contexts[b], root_logits[b], k, depth, total)
        assert paths_of(tree, b) == want


class RankDraft(ContextDraft):
    """Token t always has rank t, so a static tree's node tokens spell its branch choices."""

    def logits_of(self, seen: tuple[int, ...]) -> torch.Tensor:
        return -torch.arange(self.vocab, dtype=torch.float32)


def test_static_tree_nodes_are_the_choices():
    text = "0,1,3,00,02,10,000,001,0000,11,110"
    paths = parse_static_tree(text)
    draft = RankDraft(10)
    cache = draft.new_cache(2, 32)
    cache.set_lengths([3, 5])
    root = DraftRoot(-torch.arange(10.0).expand(2, -1), torch.zeros(2, 1))
    tree, _, _ = expand(draft, cache, root, torch.zeros(2, dtype=torch.long),
                        torch.tensor([3, 5]), static_shape(paths), 0.0, 1.0, 10)
    for b in range(2):
        assert paths_of(tree, b) == set(paths)


def test_static_tree_errors():
    for bad in ("", "0,a1", "0,11", "00"):
        with pytest.raises(ConfigError, match="static_tree"):
            parse_static_tree(bad)


class RandomTreeProposer:
    """Random trees each step: random shapes and depths, some nodes carrying the target's
    greedy token (from a reference decode), padding nodes (some carrying it too)."""

    hidden_layers = ()
    room = 16
    forwards_per_step = 0
    prefill_forwards = 0
    plain = False

    def __init__(self, reference: dict[tuple[int, ...], list[int]], seed: int):
        self.reference, self.rng = reference, random.Random(seed)

    def start(self, pre):
        return RandomTreeState(self, [list(p) + [f] for p, f in
                                      zip(pre.prompts, pre.first.tolist())],
                               [tuple(p) for p in pre.prompts])


class RandomTreeState:
    def __init__(self, p, histories, keys):
        self.p, self.histories, self.keys = p, histories, keys

    def propose(self, roots, lengths, generator):
        rng, trees = self.p.rng, []
        n = rng.randint(1, 12)
        pad_to = n + rng.randint(0, 3)
        for hist, key in zip(self.histories, self.keys):
            truth = list(key) + self.p.reference[key]
            tr = random_tree(rng, n, 1)  # shape only
            on_track = [True] + [False] * (n - 1)
            tokens = [hist[-1]]
            for i in range(1, n):
                par = tr["parents"][i]
                at = len(hist) + tr["depth"][i] - 1  # index in truth of this node's token
                right = on_track[par] and at < len(truth) and rng.random() < 0.6
                tokens.append(truth[at] if right else rng.randrange(96))
                on_track[i] = on_track[par] and at < len(truth) and tokens[i] == truth[at]
            tokens += [truth[len(hist)] if len(hist) < len(truth) else 0] * (pad_to - n)
            trees.append(dict(parents=tr["parents"] + [0] * (pad_to - n),
                              depth=tr["depth"] + [1] * (pad_to - n), tokens=tokens,
                              valid=[True] * n + [False] * (pad_to - n)))
        return stack(trees), None

    def commit(self, verdict, target_out, lengths, emitted):
        for h, new in zip(self.histories, emitted):
            h += new

    def select(self, rows):
        idx = rows.tolist()
        return RandomTreeState(self.p, [self.histories[i] for i in idx],
                               [self.keys[i] for i in idx])

    def put(self, rows, other):
        for i, h, k in zip(rows.tolist(), other.histories, other.keys):
            self.histories[i], self.keys[i] = h, k


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_engine_with_random_trees_equals_plain(batch):
    target = tiny_target(96)
    prompts = prompts_of([4, 9, 2, 13, 6, 7], 96, seed=3)
    ref = plain_decode(target.model, prompts, 25, target.eos_token_ids, decode_batch_size=1)
    reference = {tuple(p): t for p, t in zip(prompts, ref.tokens)}
    for seed in range(3):
        with torch.inference_mode():
            res = Decoder(target.model, prompts, RandomTreeProposer(reference, seed), 25,
                          batch).run()
        assert res.tokens == ref.tokens
        assert res.tau > 1.3  # the right guesses were accepted
