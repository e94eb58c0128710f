"""NBCE in the native engine: the rows of one request, kept and stepped together.

A request with contexts becomes n + 1 sequences, row 0 the question alone.
They are admitted together, prefilled together (as many chunks per step as
the token budget holds; contexts come first in each row, so the prefix cache
serves the same documents to a new question), and join the decode batch
together once every row's prompt is cached. Each step the group merges
its rows' logits (patches/nbce.py), the request's sampler draws one token
from the merged distribution, and every row takes that token. Row 0 talks to
the client (text, stop strings, logprobs, the context each token came from);
the other rows follow silently. Whatever ends row 0 ends every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longserve.patches.nbce import NbceParams, nbce_merge
from longserve.server.engine.native.row_group import GroupActions, RowGroup
from longserve.server.engine.native.sequence import Sequence


@dataclass(eq=False)
class NbceGroup(RowGroup):
    params: NbceParams
    previous: int | None = None  # the row chosen at the previous step
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> logits after its prompt

    def prompt_cached(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor | None:
        """Record that `seq` has its prompt cached; every row's logits once all have."""
        self.prompt_logits[self.rows.index(seq)] = logits
        if len(self.prompt_logits) < len(self.rows):
            return None
        self.leader.cached_tokens = sum(row.cached_tokens for row in self.rows)  # usage counts every row's prompt
        return torch.stack([self.prompt_logits.pop(row) for row in range(len(self.rows))])

    def advance(self, logits: torch.Tensor, sample, tokenizer, first: bool = False) -> GroupActions:
        """Sample the group's token from its merged distribution; every row takes it. The client sees the leader."""
        leader = self.leader
        tokens, records = sample(self.merge(logits), [leader])
        previous = leader.last_token_time
        leader.append(tokens[0], records[0])
        self.follow(tokens[0])
        return GroupActions([leader], took_token=[(leader, previous)], finished=leader.finish_reason)

    def merge(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] in row order -> merged log-probabilities [1, vocab]; remembers the choice."""
        result = nbce_merge(logits, self.params, self.previous)
        self.previous = result.chosen
        self.leader.context_ids.append(result.chosen - 1)  # row k holds context k - 1
        return result.merged.unsqueeze(0)

    def follow(self, token: int) -> None:
        """Every other row takes the token the leader took."""
        for row in self.rows[1:]:
            row.output_ids.append(token)
