"""Sequences of one request that are admitted, decoded and finished together (NBCE, beam search).

The engine knows a group through this interface only:
- `prompt_cached(seq, logits)`: a row's prompt is in the cache, with the logits
  after it; returns the group's first logits [rows, vocab] once the group can
  take its first step, else None (its rows stay parked);
- `advance(logits, sample, tokenizer, first)`: one step from logits [rows,
  vocab] in row order. The group samples (with `sample`, the engine's pure
  sampler) or searches, and returns what it wants done (GroupActions): rows
  that take another row's cache, rows that took a token, the reason the whole
  group ends, the rows the client sees. The engine does it; a group never
  calls back into the engine.
The scheduler admits a group's rows together, reserves the blocks they can
grow into, and never preempts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longserve.server.engine.native.sequence import Sequence


@dataclass
class GroupActions:
    shown: list[Sequence]  # the rows whose output the client sees (and the metrics count)
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (row, source): row continues source's cache
    took_token: list[tuple[Sequence, float | None]] = field(default_factory=list)  # (row, its previous token's time)
    finished: str | None = None  # every row of the group ends, for this reason


@dataclass(eq=False)
class RowGroup:
    rows: list[Sequence]  # row 0 is the leader
    shares_prompt = False  # True: the scheduler prefills the leader only; the others share its blocks

    def __post_init__(self):
        self.reserve = 0  # KV-cache blocks still promised to this group (block_manager.py)
        for row in self.rows:
            row.group = self

    @property
    def leader(self) -> Sequence:
        return self.rows[0]

    def prompt_cached(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def advance(self, logits: torch.Tensor, sample, tokenizer, first: bool = False) -> GroupActions:
        raise NotImplementedError
