"""Request extensions at the HTTP edge: one adapter per extension, request fields in, response fields out.

A plain request has no adapter, and runs none of this code. For a request
that uses an extension, server/choice_stream.py makes its adapter
(`extensions_of`) and calls the hooks below, in this order:

1. `conversations` (chat) or `prompts` (completions): the prompts to tokenize,
   where the extension changes them (NBCE: one row per context); chat also
   asks `template_conversation` and `template_args` how to call the chat
   template (tools: `tools=`, or the tools written into the system message);
2. `prompt_label`: how an error names prompt i (NBCE: "the row of contexts[c]");
3. `prepare`: check the request against the server, then set the extension's
   fields of the engine's GenerationRequest (structured outputs: the grammar);
4. `observe`: every delta of the engine, as it arrives;
5. `fields`: the extension's response fields of a choice (server/responses.py
   declares them): all of them in a full response, and in a stream those that
   arrived since the choice's previous chunk; chat also asks `message` for a
   finished choice's content and tool calls, and a stream asks `stream_text`
   what of each piece to send now and `flush` what is left at the end.
"""

from __future__ import annotations

from longserve.server.engine.base import GenerationRequest, SeqDelta


class Extension:
    """Every hook does nothing; an adapter overrides those it needs."""

    def conversations(self, messages: list) -> list[list] | None:
        """Chat: the conversations to template, one per prompt; None leaves the request's messages alone."""
        return None

    def prompts(self, prompt, tokenizer) -> list[list[int]] | None:
        """Completions: the prompts' token ids; None tokenizes the request's prompt as usual."""
        return None

    def template_conversation(self, conversation: list[dict]) -> list[dict]:
        """Chat: the conversation as the template gets it."""
        return conversation

    def template_args(self) -> dict:
        """Chat: more arguments of the chat template."""
        return {}

    def prompt_label(self, index: int) -> tuple[str, str | None] | None:
        """How an error names prompt `index`, and the field to blame; None for the usual."""
        return None

    async def prepare(self, request: GenerationRequest, state) -> None:
        """Check the request against the server (`state`: the app's), then set the engine's fields."""

    def observe(self, delta: SeqDelta) -> None:
        """See one delta of the engine."""

    def fields(self, index: int, finished: bool) -> dict:
        """The response fields of choice `index`; a stream asks after each delta, and gets what is new."""
        return {}

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict]] | None:
        """Chat: a finished choice's content and tool calls ({name, arguments}); None leaves the text as content."""
        return None

    def stream_text(self, index: int, text: str) -> str:
        """Chat streams: what of a piece of choice `index` to send as content now."""
        return text

    def flush(self, index: int, text: str, finish_reason: str | None) -> tuple[str, list[dict]]:
        """Chat streams: at choice `index`'s end (whole text `text`), the content held back and the tool calls."""
        return "", []
