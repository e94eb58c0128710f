"""The NBCE extension of both endpoints: `contexts` and `nbce` in, one row per context out.

Rows (README, "NBCE"): row 0 is the request without any context; for
completions row k is exactly `contexts[k] + "\\n\\n" + prompt`; for chat the
context and a blank line go at the start of the last user message. The
engine decodes one answer over all rows (patches/nbce.py).
"""

from __future__ import annotations

from patches.nbce import NbceParams
from server.errors import APIError
from server.protocol import ChatMessage, SamplingFields
from server.serving import check_length

CONTEXT_SEPARATOR = "\n\n"


def check_context_count(body: SamplingFields, max_contexts: int, max_num_seqs: int) -> None:
    limit = min(max_contexts, max_num_seqs - 1)
    if len(body.contexts) > limit:
        raise APIError(
            400,
            f"contexts has {len(body.contexts)} entries; this server takes at most {limit} "
            f"(--max-contexts {max_contexts}; the rows, contexts + 1, must fit --max-num-seqs {max_num_seqs})",
            "contexts",
        )


def completion_rows(prompt, contexts: list[str], tokenizer) -> list[list[int]]:
    if not isinstance(prompt, str):
        raise APIError(400, "with contexts, prompt must be one string (each row is context + blank line + prompt)", "prompt")
    return [tokenizer.encode(prompt)] + [tokenizer.encode(context + CONTEXT_SEPARATOR + prompt) for context in contexts]


def chat_rows(messages: list[ChatMessage], contexts: list[str]) -> list[list[ChatMessage]]:
    users = [i for i, message in enumerate(messages) if message.role == "user"]
    if not users:
        raise APIError(400, "with contexts, the messages need a user message to put each context in", "messages")
    last = users[-1]
    try:
        question = messages[last].text()
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from None

    def with_context(context: str) -> list[ChatMessage]:
        edited = messages[last].model_copy(update={"content": context + CONTEXT_SEPARATOR + question})
        return messages[:last] + [edited] + messages[last + 1 :]

    return [list(messages)] + [with_context(context) for context in contexts]


def check_rows(rows: list[list[int]], max_tokens: int, max_model_len: int) -> None:
    for k, row in enumerate(rows):
        which = "the row without context" if k == 0 else f"the row of contexts[{k - 1}]"
        check_length(len(row), max_tokens, max_model_len, which=which, param="contexts" if k else None)


def nbce_params(body: SamplingFields) -> NbceParams:
    return body.nbce or NbceParams()
