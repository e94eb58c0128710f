"""Generation held to a constraint, per sequence: one interface, two kinds, one batched mask.

A constraint (the `SequenceConstraint` protocol) says which tokens may come next, as
bits of a bitmask row (or as token ids, for beam search); takes each token (`advance`, True when the output is
complete and the sequence stops); and copies itself for a beam (`fork`).

- KeyState: the keys of a token trie (patches/trie.py). Where a key may end,
  the model's end token (EOS) stands for the end-of-key edge. A key is
  complete when the end token is taken, or when the walk reaches a node from
  which nothing but the end of the key follows; the sequence then stops with
  that key's entry. A sequence cut by max_tokens has no entry.
- GrammarState: an xgrammar matcher over a compiled grammar (JSON schema,
  regex, choices, EBNF; server/extensions/structured.py compiles them). It
  is complete when the grammar has ended and the end token was taken.

`mask_logits` fills one bitmask for the whole batch, a row per constrained
sequence, and applies it in one tensor op (xgrammar's kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from patches.trie import END, TokenTrie
from server.engine.base import KeyConstraint


class SequenceConstraint(Protocol):
    entry: int | None  # keys: the finished key's entry; None otherwise

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row `row` of `bitmask` (int32 [rows, ceil(vocab / 32)], bit t = token t) to the allowed tokens."""

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """The allowed tokens' ids (int64), for beam search."""

    def advance(self, token: int) -> bool:
        """Take `token`; True when the output is complete."""

    def fork(self) -> "SequenceConstraint": ...


@dataclass
class KeyState:
    constraint: KeyConstraint
    node: int = TokenTrie.ROOT
    entry: int | None = None  # set once a key is complete

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        return torch.from_numpy(self.constraint.trie.allowed_tokens(self.node, self.constraint.end_token)).long()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        allowed = self.constraint.trie.allowed_tokens(self.node, self.constraint.end_token)
        bits = np.zeros(bitmask.shape[1] * 32, dtype=bool)
        bits[allowed] = True
        bitmask[row] = torch.from_numpy(np.packbits(bits, bitorder="little").view(np.int32))

    def advance(self, token: int) -> bool:
        trie = self.constraint.trie
        if token == self.constraint.end_token and trie.entry_at(self.node) is not None:
            self.entry = trie.entry_at(self.node)
            return True
        node = trie.step(self.node, token)
        if node is None:  # the mask makes this unreachable; failing loudly beats a wrong answer
            raise RuntimeError(f"token {token} does not continue any key from trie node {self.node}")
        self.node = node
        allowed = trie.allowed(node)
        if len(allowed) == 1 and allowed[0] == END:
            self.entry = trie.entry_at(node)
            return True
        return False

    def fork(self) -> "KeyState":
        return KeyState(self.constraint, self.node, self.entry)


class GrammarState:
    entry = None

    def __init__(self, compiled=None, matcher=None):
        import xgrammar

        self.matcher = matcher if matcher is not None else xgrammar.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.fill_bitmask(bitmask, 0)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
        return torch.from_numpy(np.flatnonzero(bits))

    def advance(self, token: int) -> bool:
        if not self.matcher.accept_token(token):  # the mask makes this unreachable
            raise RuntimeError(f"token {token} does not continue the grammar")
        return self.matcher.is_terminated()

    def fork(self) -> "GrammarState":
        return GrammarState(matcher=self.matcher.fork())


def mask_logits(logits: torch.Tensor, constraints: list[SequenceConstraint | None]) -> torch.Tensor:
    """`logits` [rows, vocab] with -inf, in place, on each token a row's constraint does not allow."""
    import xgrammar

    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(constraints), logits.shape[-1])
    for row in rows:
        constraints[row].fill_bitmask(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return logits
