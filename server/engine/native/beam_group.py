"""Beam search under a constraint: the n best distinct answers, best first, with their scores.

A request with use_beam_search and a constraint (a trie's keys, or a grammar:
constraint.py) becomes n sequences (n = the beam width) with one prompt. Only
the first is prefilled; the others share its blocks (copy on write). Each step
every live beam proposes its best allowed next tokens, scored by the model's
own log-probabilities (the sum over the answer's tokens, end step included);
the n best continuations become the next beams, and the rows' block tables
follow their parents. A continuation that completes an answer leaves the beam
as a finished hypothesis; answers are distinct keys for a trie, distinct
texts for a grammar. The search stops when n answers are
finished and no live beam can still beat the worst of them (scores only
fall), when nothing is live, or at max_tokens; beams cut there are reported
with finish_reason "length" and no key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longserve.server.engine.native.constraint import SequenceConstraint
from longserve.server.engine.native.row_group import GroupActions, RowGroup
from longserve.server.engine.native.sequence import Sequence


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float
    state: SequenceConstraint

    def answer(self, tokenizer):
        """What makes two finished hypotheses the same answer: the key's entry, or else the text (a grammar
        allows every tokenization of a text; one answer of each)."""
        return self.state.entry if self.state.entry is not None else tokenizer.decode(self.tokens, skip_special_tokens=True)


@dataclass(eq=False)
class BeamGroup(RowGroup):
    width: int
    live: list[Hypothesis | None] = field(default_factory=list)  # one per row; None: the row idles
    finished: list[Hypothesis] = field(default_factory=list)
    shares_prompt = True  # the scheduler prefills the leader only

    def prompt_cached(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor | None:
        """The leader's prompt is every beam's prompt: the search starts at once."""
        return logits.unsqueeze(0)

    def advance(self, logits: torch.Tensor, sample, tokenizer, first: bool = False) -> GroupActions:
        """One search step; every row's blocks and tokens then follow the beam it now holds."""
        sources = self.step(logits, tokenizer, first)
        forks = [(row, self.rows[src]) for row, src in zip(self.rows, sources) if first or row is not self.rows[src]]
        fallback = next((h for h in self.live if h is not None), None)
        for row, hypothesis in zip(self.rows, self.live):
            row.output_ids = list((hypothesis or fallback).tokens) if (hypothesis or fallback) else row.output_ids
        if not self.done():  # nothing to show yet: a live beam's tokens may still be dropped or reordered
            return GroupActions([], forks)
        self.finish(tokenizer)
        return GroupActions(self.rows, forks, finished="stop")

    def finish(self, tokenizer) -> None:
        """Write the answers into the rows, best first; rows beyond the answers end empty."""
        answers = self.results()
        for index, row in enumerate(self.rows):
            if index < len(answers):
                hypothesis, reason = answers[index]
                row.output_ids, row.constraint, row.score = hypothesis.tokens, hypothesis.state, hypothesis.score
                row.text = tokenizer.decode(hypothesis.tokens, skip_special_tokens=True)
            else:  # its own constraint never advanced: no key
                row.output_ids, row.text, reason = [], "", "length"
            row.finish(reason)

    def step(self, logits: torch.Tensor, tokenizer, first: bool = False) -> list[int]:
        """Advance with logits [rows, vocab]; returns, per row, the row whose cache it continues."""
        logprobs = logits.float().log_softmax(dim=-1)
        # rows keep their own constraints unadvanced until finish(): the leader's is the search's start
        parents = [Hypothesis([], 0.0, self.leader.constraint.fork())] if first else self.live
        candidates = []  # (score, parent row, token)
        for row, parent in enumerate(parents):
            if parent is None:
                continue
            allowed = parent.state.allowed_tokens(logprobs.shape[-1]).to(logprobs.device)
            scores = logprobs[row, allowed]
            best = scores.topk(min(self.width, len(allowed)))
            for value, index in zip(best.values.tolist(), best.indices.tolist()):
                candidates.append((parent.score + value, row, int(allowed[index])))
        candidates.sort(key=lambda c: -c[0])
        live, sources = [], []
        for score, row, token in candidates:
            if len(live) == self.width:
                break
            parent = parents[row]
            state = parent.state.fork()
            hypothesis = Hypothesis(parent.tokens + [token], score, state)
            if state.advance(token):
                self.keep_finished(hypothesis, tokenizer)
            else:
                live.append(hypothesis)
                sources.append(row)
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width :]
        self.live = live + [None] * (len(self.rows) - len(live))
        return sources + [sources[0] if sources else 0] * (len(self.rows) - len(sources))

    def keep_finished(self, hypothesis: Hypothesis, tokenizer) -> None:
        """One entry per answer: another tokenization of the same text keeps the better score."""
        answer = hypothesis.answer(tokenizer)
        same = next((i for i, h in enumerate(self.finished) if h.answer(tokenizer) == answer), None)
        if same is None:
            self.finished.append(hypothesis)
        elif hypothesis.score > self.finished[same].score:
            self.finished[same] = hypothesis

    def done(self) -> bool:
        live_scores = [h.score for h in self.live if h is not None]
        steps = max((len(h.tokens) for h in self.live if h is not None), default=0)
        if not live_scores or steps >= self.leader.params.max_tokens:
            return True
        return len(self.finished) >= self.width and max(live_scores) <= self.finished[-1].score

    def results(self) -> list[tuple[Hypothesis, str]]:
        """The answers, best first: finished keys, then (if too few) the best cut beams."""
        answers = [(h, "stop") for h in self.finished]
        cut = sorted((h for h in self.live if h is not None), key=lambda h: -h.score)
        answers += [(h, "length") for h in cut[: self.width - len(answers)]]
        return answers
