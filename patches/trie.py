"""A compact prefix trie over token sequences, for generation constrained to a set of keys.

Nodes are numbered breadth-first, so the children of a node are consecutive
nodes and need no pointers: the edges leaving node i are the label slice
labels[offsets[i]:offsets[i + 1]], sorted, and edge e leads to node e + 1
(the root is node 0). A step is a binary search in one slice; the allowed
set is the slice itself. Where a key ends, the node is listed in `end_nodes`
with the key's entry: a key that is a prefix of another key stays reachable
through an explicit end-of-key step (the engine spends the model's EOS on
it). About 6 bytes per node: a 4-byte offset and a 2-byte label.

Why by hand: marisa-trie and friends index strings and answer "which keys
start with this prefix" by enumerating them, while a decoding step needs
"which tokens may come next" at once, even at the root of a million keys.
Nothing here knows about a model, an engine or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

END = -1  # stands for the end-of-key step in `allowed`


class RepeatedKey(ValueError):
    def __init__(self, entry: int, other: int):
        super().__init__(f"entry {entry} repeats the key of entry {other}")
        self.entry, self.other = entry, other


@dataclass
class TokenTrie:
    offsets: np.ndarray  # [nodes + 1]: node i's edges are offsets[i]:offsets[i + 1]; edge e leads to node e + 1
    labels: np.ndarray  # [nodes - 1]: the token on each edge, sorted within a node
    end_nodes: np.ndarray  # int32, sorted: the nodes where a key ends
    end_entries: np.ndarray  # int32: the entry whose key ends at end_nodes[i]

    ROOT = 0

    @classmethod
    def build(cls, keys: list[list[int]]) -> "TokenTrie":
        """A trie over token sequences; entry i is keys[i]. Empty or repeated keys are refused."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        parent, label, depth = [-1], [0], [0]  # nodes in depth-first (creation) order
        ends: list[tuple[int, int]] = []  # (node, entry)
        path = [0]  # the nodes along the previous key: path[d] is the node at depth d
        previous: list[int] = []
        previous_entry = -1
        for entry in order:
            key = keys[entry]
            if not key:
                raise ValueError(f"entry {entry} has an empty key")
            if key == previous:
                raise RepeatedKey(max(entry, previous_entry), min(entry, previous_entry))
            shared = 0
            limit = min(len(key), len(previous))
            while shared < limit and key[shared] == previous[shared]:
                shared += 1
            del path[shared + 1 :]
            for d in range(shared, len(key)):
                parent.append(path[d])
                label.append(key[d])
                depth.append(d + 1)
                path.append(len(parent) - 1)
            ends.append((path[len(key)], entry))
            previous, previous_entry = key, entry
        return cls._breadth_first(np.asarray(parent), np.asarray(label), np.asarray(depth), ends, len(keys))

    @classmethod
    def _breadth_first(cls, parent, label, depth, ends, num_keys) -> "TokenTrie":
        """Renumber depth-first nodes breadth-first: by depth, then by parent, then by label.

        Within one parent, creation order is already label order (the keys were
        sorted), so a stable sort by the parent's new number finishes the job.
        """
        count = len(parent)
        new_id = np.zeros(count, dtype=np.int64)
        next_id = 1
        by_depth = np.argsort(depth, kind="stable")
        bounds = np.searchsorted(depth[by_depth], np.arange(depth.max() + 2))
        for d in range(1, depth.max() + 1):
            level = by_depth[bounds[d] : bounds[d + 1]]
            level = level[np.argsort(new_id[parent[level]], kind="stable")]
            new_id[level] = np.arange(next_id, next_id + len(level))
            next_id += len(level)
        order = np.argsort(new_id)  # old ids in breadth-first order
        parents = new_id[parent[order[1:]]]
        index_type = np.int32 if count < 2**31 else np.int64
        offsets = np.zeros(count + 1, dtype=index_type)
        np.cumsum(np.bincount(parents, minlength=count), out=offsets[1:])
        label_type = np.uint16 if label.max(initial=0) < 2**16 else np.int32
        end_nodes = np.asarray([new_id[node] for node, _ in ends], dtype=np.int64)
        end_order = np.argsort(end_nodes)
        end_entries = np.asarray([entry for _, entry in ends], dtype=np.int32)[end_order]
        trie = cls(offsets, label[order[1:]].astype(label_type), end_nodes[end_order].astype(np.int32), end_entries)
        assert trie.num_keys == num_keys
        return trie

    @property
    def num_nodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_keys(self) -> int:
        return len(self.end_nodes)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.labels.nbytes + self.end_nodes.nbytes + self.end_entries.nbytes

    def children(self, node: int) -> np.ndarray:
        """The tokens that continue some key from `node`, sorted."""
        return self.labels[self.offsets[node] : self.offsets[node + 1]]

    def allowed(self, node: int) -> np.ndarray:
        """What may follow `node` (int64): END first where a key ends here, then the tokens."""
        tokens = self.children(node).astype(np.int64)
        return np.concatenate(([END], tokens)) if self.entry_at(node) is not None else tokens

    def allowed_tokens(self, node: int, end_token: int) -> np.ndarray:
        """`allowed(node)` with the end-of-key step spelled as the model's `end_token`."""
        allowed = self.allowed(node)
        return np.where(allowed == END, end_token, allowed)

    def step(self, node: int, token: int) -> int | None:
        """The node after `token`, or None when no key continues that way."""
        start, stop = int(self.offsets[node]), int(self.offsets[node + 1])
        if token < 0:
            return None
        at = start + int(np.searchsorted(self.labels[start:stop], token))
        return at + 1 if at < stop and self.labels[at] == token else None

    def entry_at(self, node: int) -> int | None:
        """The entry whose key ends at `node`, or None."""
        # the node in the array's own dtype: a Python int would make numpy cast all of end_nodes first (1 ms at 1M keys)
        at = int(np.searchsorted(self.end_nodes, self.end_nodes.dtype.type(node)))
        return int(self.end_entries[at]) if at < len(self.end_nodes) and self.end_nodes[at] == node else None

    def walk(self, tokens: list[int]) -> int | None:
        node = self.ROOT
        for token in tokens:
            node = self.step(node, token)
            if node is None:
                return None
        return node

    def entry_for(self, tokens: list[int], end_token: int) -> int | None:
        """The entry whose key `tokens` spell out (a trailing `end_token` dropped), or None."""
        if tokens and tokens[-1] == end_token:
            tokens = tokens[:-1]
        node = self.walk(tokens)
        return None if node is None else self.entry_at(node)

    def save(self, path) -> None:
        np.savez(path, offsets=self.offsets, labels=self.labels, end_nodes=self.end_nodes, end_entries=self.end_entries)

    @classmethod
    def load(cls, path) -> "TokenTrie":
        with np.load(path) as data:
            return cls(data["offsets"], data["labels"], data["end_nodes"], data["end_entries"])
