"""Answers restricted to the keys of a knowledge base: `constraint` in; `key` and `value` out (with
`use_beam_search`, server/extensions/beam.py, the n best distinct keys).

A registered trie comes from the app's KnowledgeStore (server/knowledge.py,
/v1/tries); inline choices are built into a trie for this request only.
"""

from __future__ import annotations

import asyncio

from longserve.server.engine.base import KeyConstraint
from longserve.server.errors import APIError
from longserve.server.extensions import Extension
from longserve.server.knowledge import EntryError, build


class Keys(Extension):
    def __init__(self, body, state):
        self.constraint = body.constraint
        self.beam_width: int | None = body.n if body.use_beam_search else None  # distinct keys asked for
        self.base = None  # the KnowledgeBase that answers, once prepared
        self.entries: dict[int, int] = {}  # choice index -> its finished key's entry

    async def prepare(self, request, state) -> None:
        """Find or build the trie; inline choices are tokenized and built in a worker thread (about 0.2 s for
        10,000 choices): other requests' streams go on meanwhile."""
        engine = state.engine
        if self.constraint.trie is not None:
            self.base = find_base(state.knowledge, self.constraint.trie)
        else:
            entries = [{"key": choice, "value": None} for choice in self.constraint.choices]
            try:
                self.base = await asyncio.to_thread(build, "inline", entries, engine.tokenizer, self.constraint.lead,
                                                    state.knowledge.limits)
            except EntryError as exc:
                raise APIError(400, str(exc).replace("entry", "choice", 1), "constraint.choices") from None
        width = self.beam_width
        if width is not None and width > self.base.num_keys:
            raise APIError(400, f"a beam of n = {width} asks for more distinct keys than the {self.base.num_keys} there are; lower n", "n")
        end_token = engine.tokenizer.eos_token_id
        if end_token is None:
            raise APIError(400, "this model has no end-of-sequence token to end a key with", "constraint")
        request.constraint = KeyConstraint(self.base.trie, end_token)

    def observe(self, delta) -> None:
        if delta.entry is not None:
            self.entries[delta.index] = delta.entry

    def fields(self, index: int, finished: bool) -> dict:
        """Once the choice is finished: its key and the stored value (null when no whole key came out)."""
        if not finished:
            return {}
        entry = self.entries.get(index)
        return {"key": None, "value": None} if entry is None else {"key": self.base.key(entry), "value": self.base.value(entry)}


def find_base(store, name: str):
    base = store.bases.get(name)
    if base is None:
        known = ", ".join(sorted(store.bases)) or "none yet"
        raise APIError(404, f"no trie named {name!r}; this server has: {known}", "name", "trie_not_found")
    return base
