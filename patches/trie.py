"""A compact prefix trie over token sequences, for generation constrained to a set of keys.

Nodes are numbered in depth-first order; the edges leaving a node sit in one
contiguous, label-sorted slice of two numpy arrays (CSR form), so a step is a
binary search in that slice and the allowed set is the slice itself. Where a
key ends, the node has an edge labelled END to the key's entry: a key that
is a prefix of another key stays reachable, through an explicit end-of-key
step (the engine spends the model's EOS token on it).

Why by hand: marisa-trie and friends index strings and answer "which keys
start with this prefix", enumerating them all, while a decoding step needs
"which tokens may come next" at once, even at the root of a million keys.
Nothing here knows about a model, an engine or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

END = -1  # the label of the edge from the node where a key ends to that key's entry


@dataclass
class TokenTrie:
    offsets: np.ndarray  # int64 [nodes + 1]: the edges of node i are offsets[i]:offsets[i + 1]
    labels: np.ndarray  # int32 [edges]: token ids, sorted within a node, END first
    targets: np.ndarray  # int32 [edges]: the child node, or for END the entry index
    num_keys: int

    ROOT = 0

    @classmethod
    def build(cls, keys: list[list[int]]) -> "TokenTrie":
        """A trie over token sequences; entry i is keys[i]. Empty or repeated keys are refused."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        parents, labels, targets = [], [], []
        path = [0]  # the nodes along the previous key: path[d] is the node at depth d
        previous: list[int] = []
        num_nodes = 1
        for entry in order:
            key = keys[entry]
            if not key:
                raise ValueError(f"entry {entry} has an empty key")
            if key == previous:
                raise ValueError(f"entry {entry} repeats the key of another entry")
            shared = 0
            limit = min(len(key), len(previous))
            while shared < limit and key[shared] == previous[shared]:
                shared += 1
            del path[shared + 1 :]
            for depth in range(shared, len(key)):
                parents.append(path[depth])
                labels.append(key[depth])
                targets.append(num_nodes)
                path.append(num_nodes)
                num_nodes += 1
            parents.append(path[len(key)])
            labels.append(END)
            targets.append(entry)
            previous = key
        parents_array = np.asarray(parents, dtype=np.int64)
        # Depth-first numbering: sorting edges by parent (stably) keeps each node's labels in key order,
        # except END, which sorted order puts before the longer keys sharing the prefix.
        by_parent = np.argsort(parents_array, kind="stable")
        offsets = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(parents_array, minlength=num_nodes), out=offsets[1:])
        return cls(offsets, np.asarray(labels, dtype=np.int32)[by_parent], np.asarray(targets, dtype=np.int32)[by_parent], len(keys))

    @property
    def num_nodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.labels.nbytes + self.targets.nbytes

    def allowed(self, node: int) -> np.ndarray:
        """The labels that may follow `node`: token ids, and END where a key ends here."""
        return self.labels[self.offsets[node] : self.offsets[node + 1]]

    def step(self, node: int, token: int) -> int | None:
        """The node after `token`, or None when no key continues that way."""
        start, stop = self.offsets[node], self.offsets[node + 1]
        at = start + np.searchsorted(self.labels[start:stop], token)
        if at < stop and self.labels[at] == token and token != END:
            return int(self.targets[at])
        return None

    def entry_at(self, node: int) -> int | None:
        """The entry whose key ends at `node`, or None."""
        start, stop = self.offsets[node], self.offsets[node + 1]
        if start < stop and self.labels[start] == END:
            return int(self.targets[start])
        return None

    def walk(self, tokens: list[int]) -> int | None:
        node = self.ROOT
        for token in tokens:
            node = self.step(node, token)
            if node is None:
                return None
        return node
