"""NBCE: `contexts` and `nbce` in; one row per context to the engine; `nbce_context_ids` out.

Rows (README, "NBCE"): row 0 is the request without any context; for
completions row k is exactly `contexts[k] + "\\n\\n" + prompt`; for chat the
context and a blank line go at the start of the last user message. The
engine decodes one answer over all rows (patches/nbce.py).
"""

from __future__ import annotations

from longserve.patches.nbce import NbceParams
from longserve.server.errors import APIError
from longserve.server.extensions import Extension

CONTEXT_SEPARATOR = "\n\n"


class Nbce(Extension):
    def __init__(self, body, state):
        self.contexts: list[str] = body.contexts
        self.params: NbceParams = body.nbce or NbceParams()
        self.context_ids: list[int] = []  # the context of each token since the last response fields
        if getattr(body, "echo", False):  # completions only
            raise APIError(400, "echo is not supported with contexts: the rows have different prompts", "echo")
        self.check_count(state.settings.max_contexts, state.engine.max_num_seqs)

    def check_count(self, max_contexts: int, max_num_seqs: int) -> None:
        limit = min(max_contexts, max_num_seqs - 1)
        if len(self.contexts) > limit:
            raise APIError(
                400,
                f"contexts has {len(self.contexts)} entries; this server takes at most {limit} "
                f"(--max-contexts {max_contexts}; the rows, contexts + 1, must fit --max-num-seqs {max_num_seqs})",
                "contexts",
            )

    def prompts(self, prompt, tokenizer) -> list[list[int]]:
        if not isinstance(prompt, str):
            raise APIError(400, "with contexts, prompt must be one string (each row is context + blank line + prompt)", "prompt")
        return [tokenizer.encode(prompt)] + [tokenizer.encode(context + CONTEXT_SEPARATOR + prompt) for context in self.contexts]

    def conversations(self, messages: list) -> list[list]:
        users = [i for i, message in enumerate(messages) if message.role == "user"]
        if not users:
            raise APIError(400, "with contexts, the messages need a user message to put each context in", "messages")
        last = users[-1]
        try:
            question = messages[last].text()
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None

        def with_context(context: str) -> list:
            edited = messages[last].model_copy(update={"content": context + CONTEXT_SEPARATOR + question})
            return messages[:last] + [edited] + messages[last + 1 :]

        return [list(messages)] + [with_context(context) for context in self.contexts]

    def prompt_label(self, index: int) -> tuple[str, str | None]:
        return ("the row without context", None) if index == 0 else (f"the row of contexts[{index - 1}]", "contexts")

    async def prepare(self, request, state) -> None:
        request.nbce = self.params

    def observe(self, delta) -> None:
        self.context_ids += delta.context_ids or []

    def fields(self, index: int, finished: bool) -> dict:
        sent, self.context_ids = self.context_ids, []
        return {"nbce_context_ids": sent}
