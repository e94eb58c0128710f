"""NBCE (naive Bayes-based context extension): one next-token distribution from many contexts.

Row 0 holds the question alone; rows 1..n hold one context each, followed by
the question (patches/README.md, section 2). Each step (a pure function of the rows'
logits):

1. l_k = log_softmax(logits_k) for every row;
2. top-p truncate each row: entries outside its nucleus become -inf;
3. entropy H_k of each truncated context row (-sum p log p over the kept
   entries, not renormalized); the row chosen at the previous step gets a
   stickiness bonus eta subtracted; the row k* with the lowest H is chosen;
4. merged = (1 + beta) * l_k* - beta * l_0 where l_0 is finite, else l_k*.

The engine then samples from `merged` with the request's own settings and
appends the token to every row. Row 0 is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


class NbceParams(BaseModel):
    """The `nbce` object of a request."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    beta: float = Field(0.25, ge=0.0, le=10.0, description="how hard the chosen context is sharpened against the question alone")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus kept in each row before entropies are compared")
    stickiness: float = Field(0.1, ge=0.0, le=10.0, description="entropy bonus of the context chosen at the previous step")


@dataclass
class MergeResult:
    merged: torch.Tensor  # [vocab] log-probabilities to sample from (-inf outside the chosen nucleus)
    chosen: int  # the chosen row, 1..n
    entropies: torch.Tensor  # [n + 1]; row 0's is +inf (never chosen)


def truncate_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their mass reaches top_p; the rest -inf."""
    if top_p >= 1.0:
        return logprobs
    sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
    probs = sorted_logprobs.exp()
    before = probs.cumsum(dim=-1) - probs  # mass ranked above each token
    drop = before >= top_p
    drop[..., 0] = False
    kept = sorted_logprobs.masked_fill(drop, float("-inf"))
    return torch.empty_like(logprobs).scatter_(-1, order, kept)


def entropy(truncated: torch.Tensor) -> torch.Tensor:
    probs = truncated.exp()
    return -(probs * truncated.masked_fill(probs == 0, 0.0)).sum(dim=-1)


def nbce_merge(logits: torch.Tensor, params: NbceParams, previous: int | None = None) -> MergeResult:
    """One NBCE step over logits [n + 1, vocab], row 0 the question alone."""
    if logits.shape[0] < 2:
        raise ValueError("NBCE needs row 0 (the question alone) and at least one context row")
    logprobs = logits.float().log_softmax(dim=-1)
    truncated = truncate_top_p(logprobs, params.top_p)
    entropies = entropy(truncated)
    entropies[0] = float("inf")
    if previous is not None:
        entropies[previous] -= params.stickiness
    chosen = int(entropies.argmin())
    best, question = truncated[chosen], truncated[0]
    merged = torch.where(torch.isfinite(question), (1 + params.beta) * best - params.beta * question, best)
    return MergeResult(merged, chosen, entropies)
