"""Beam search: `use_beam_search` (vLLM's name) in; each choice's `score` out.

The n best distinct answers, best first, under a constraint (a trie's keys)
or a grammar (structured outputs, a forced tool call): n is the beam width.
The native engine searches (server/engine/native/beam_group.py); the score is
the answer's cumulative log-probability, end token included.
"""

from __future__ import annotations

from longserve.server.errors import APIError
from longserve.server.extensions import Extension


class Beam(Extension):
    def __init__(self, body, state):
        self.width = body.n
        self.scores: dict[int, float] = {}  # choice index -> its answer's score

    async def prepare(self, request, state) -> None:
        """Runs after the constraint's and the grammar's adapters: the request has them by now."""
        if request.constraint is None and request.grammar is None:
            raise APIError(400, "use_beam_search needs a constraint or a grammar here: add constraint {\"trie\": NAME} "
                           "or {\"choices\": [...]}, structured_outputs, or a json response_format", "use_beam_search")
        if request.nbce is not None:
            raise APIError(400, "use_beam_search does not combine with contexts (NBCE decodes one answer): drop one of them",
                           "use_beam_search")
        if len(request.prompts) != 1:  # one beam group answers one prompt
            raise APIError(400, f"use_beam_search takes one prompt, got {len(request.prompts)}: send one request per prompt", "prompt")
        if self.width > state.engine.max_num_seqs:
            raise APIError(400, f"a beam of n = {self.width} does not fit --max-num-seqs {state.engine.max_num_seqs}; lower n", "n")
        request.beam_search = True

    def observe(self, delta) -> None:
        if delta.score is not None:
            self.scores[delta.index] = delta.score

    def fields(self, index: int, finished: bool) -> dict:
        return {"score": self.scores[index]} if finished and index in self.scores else {}
