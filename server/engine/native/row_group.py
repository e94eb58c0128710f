"""Sequences of one request that are admitted, decoded and finished together (NBCE, beam search)."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.native.sequence import Sequence


@dataclass(eq=False)
class RowGroup:
    rows: list[Sequence]  # row 0 is the leader
    shares_prompt = False  # True: the scheduler prefills the leader only; the others copy its cache rows

    def __post_init__(self):
        for row in self.rows:
            row.group = self

    @property
    def leader(self) -> Sequence:
        return self.rows[0]
