"""The token trie against a plain set of keys."""

from __future__ import annotations

import random

import numpy as np
import pytest

from longserve.patches.trie import END, TokenTrie


def naive_allowed(keys: list[list[int]], prefix: list[int]) -> set[int]:
    allowed = set()
    for key in keys:
        if key[: len(prefix)] == prefix:
            allowed.add(key[len(prefix)] if len(key) > len(prefix) else END)
    return allowed


def test_every_prefix_allows_exactly_what_the_keys_allow():
    rng = random.Random(0)
    keys = {tuple(rng.randint(0, 9) for _ in range(rng.randint(1, 6))) for _ in range(400)}
    keys = [list(k) for k in keys]
    trie = TokenTrie.build(keys)
    prefixes = {tuple(k[:d]) for k in keys for d in range(len(k) + 1)}
    for prefix in prefixes:
        node = trie.walk(list(prefix))
        allowed = trie.allowed(node)
        assert set(allowed.tolist()) == naive_allowed(keys, list(prefix))
        assert np.all(np.diff(allowed) > 0)  # sorted, no repeats
    for entry, key in enumerate(keys):
        assert trie.entry_at(trie.walk(key)) == entry
    assert trie.walk([10]) is None and trie.step(trie.ROOT, END) is None


def test_a_key_that_is_a_prefix_of_another_stays_reachable():
    trie = TokenTrie.build([[5, 6, 7], [5, 6], [5]])
    assert trie.allowed(trie.walk([5])).tolist() == [END, 6]
    assert trie.entry_at(trie.walk([5, 6])) == 1 and trie.entry_at(trie.walk([5, 6, 7])) == 0
    assert trie.entry_at(trie.walk([5])) == 2 and trie.entry_at(trie.ROOT) is None


@pytest.mark.parametrize("keys,says", [([[1], []], "empty key"), ([[1, 2], [3], [1, 2]], "repeats")])
def test_empty_and_repeated_keys_are_refused(keys, says):
    with pytest.raises(ValueError, match=says):
        TokenTrie.build(keys)


def test_no_node_ever_allows_nothing_and_a_token_outside_the_keys_is_refused_loudly():
    from longserve.server.engine.base import KeyConstraint
    from longserve.server.engine.native.constraint import KeyState

    rng = random.Random(1)
    keys = [list(k) for k in {tuple(rng.randint(0, 30) for _ in range(rng.randint(1, 5))) for _ in range(300)}]
    trie = TokenTrie.build(keys)
    assert all(len(trie.allowed(node)) > 0 for node in range(trie.num_nodes))  # the empty-set guard holds by construction
    state = KeyState(KeyConstraint(trie, end_token=99))
    outside = next(t for t in range(31) if trie.step(trie.ROOT, t) is None) if len(trie.children(trie.ROOT)) < 31 else 999
    with pytest.raises(RuntimeError, match="does not continue any key"):
        state.advance(outside)
