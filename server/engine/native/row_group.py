"""Sequences of one request that are admitted, decoded and finished together (NBCE, beam search).

The engine knows a group through this interface only:
- `prompt_cached(seq, logits)`: a row's prompt is in the cache, with the logits
  after it; returns the group's first logits [rows, vocab] once the group can
  take its first step, else None (its rows stay parked);
- `advance(logits, engine, first)`: one step from logits [rows, vocab] in row
  order. The group samples or searches, and calls back the engine's `sample`,
  `fork`, `retire`, `emit` and `observe`.
The scheduler admits a group's rows together, reserves the blocks they can
grow into, and never preempts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.native.sequence import Sequence


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

    def advance(self, logits: torch.Tensor, engine, first: bool = False) -> None:
        raise NotImplementedError
