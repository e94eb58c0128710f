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
- GuidanceState: an llguidance matcher, for the JSON schemas xgrammar would
  not hold (server/extensions/guidance.py). It is complete when nothing but
  the end can follow.

Grammar matchers are timed per token against --grammar-step-timeout (TimedMatcher).

`mask_logits` fills one bitmask for the whole batch, a row per constrained
sequence, and applies it in one tensor op (xgrammar's kernel).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from longserve.patches.trie import END, TokenTrie
from longserve.server.engine.base import KeyConstraint
from longserve.server.extensions.guidance import GuidanceGrammar


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


class GrammarTooCostly(ValueError):
    """A grammar whose matcher took longer than the budget for one token: the request's doing, so a 400."""

    status = 400


class TimedMatcher:
    """A grammar matcher for one sequence (xgrammar's or llguidance's: the subclasses say how to fill, accept, end
    and copy), timed against `step_budget` seconds per token (fill + advance).

    A matcher call runs in C++ and cannot be stopped once started, and some grammars cost more with each token
    (xgrammar took 0.09, 0.7, 3 and 9 s for successive 5-character pieces of one pattern, measured); so each call is
    timed, and the token after one that went past the budget ends the request with a 400, before the next costs
    more. The loop is held at most for the call that crossed the budget."""

    entry = None

    def __init__(self, matcher, step_budget: float, clock=time.monotonic):
        self.matcher, self.step_budget, self.clock, self.spent = matcher, step_budget, clock, 0.0

    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, token: int) -> bool: ...

    def complete(self) -> bool: ...

    def copy(self): ...

    def timed(self, work):
        started = self.clock()
        result = work()
        self.spent += self.clock() - started
        return result

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.timed(lambda: self.fill(bitmask, row))

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.fill_bitmask(bitmask, 0)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab_size]
        return torch.from_numpy(np.flatnonzero(bits))

    def advance(self, token: int) -> bool:
        if not self.timed(lambda: self.accept(token)):  # the mask makes this unreachable
            raise RuntimeError(f"token {token} does not continue the grammar")
        spent, self.spent = self.spent, 0.0
        if spent > self.step_budget:
            raise GrammarTooCostly(f"the grammar took {spent:.1f} s to check one token (at most {self.step_budget:g} s, "
                                   "--grammar-step-timeout); simplify it: fewer nested repetitions or optional parts")
        return self.complete()

    def fork(self):
        return type(self)(step_budget=self.step_budget, matcher=self.copy())


class GrammarState(TimedMatcher):
    """xgrammar's matcher; complete once the grammar ended and the end token was taken."""

    def __init__(self, compiled=None, step_budget: float = math.inf, matcher=None):
        import xgrammar

        super().__init__(matcher if matcher is not None else xgrammar.GrammarMatcher(compiled), step_budget)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def complete(self) -> bool:
        return self.matcher.is_terminated()

    def copy(self):
        return self.matcher.fork()


class GuidanceState(TimedMatcher):
    """llguidance's matcher (server/extensions/guidance.py); complete once nothing but the end can follow."""

    def __init__(self, grammar=None, step_budget: float = math.inf, matcher=None):
        super().__init__(matcher if matcher is not None else grammar.matcher(), step_budget)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    def complete(self) -> bool:
        return self.matcher.is_stopped()

    def copy(self):
        return self.matcher.deep_copy()


def constraint_of(request, step_budget: float) -> SequenceConstraint | None:
    """A sequence's own constraint state for `request` (a GenerationRequest): the keys of a trie, or a grammar's
    matcher (xgrammar, or llguidance for the grammars compiled there), timed against `step_budget` seconds a token."""
    if request.constraint is not None:
        return KeyState(request.constraint)
    if request.grammar is None:
        return None
    if isinstance(request.grammar.compiled, GuidanceGrammar):
        return GuidanceState(request.grammar.compiled, step_budget)
    return GrammarState(request.grammar.compiled, step_budget)


def mask_logits(logits: torch.Tensor, constraints: list[SequenceConstraint | None]) -> torch.Tensor:
    """`logits` [rows, vocab] with -inf, in place, on each token a row's constraint does not allow."""
    import xgrammar

    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(constraints), logits.shape[-1])
    for row in rows:
        constraints[row].fill_bitmask(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return logits
