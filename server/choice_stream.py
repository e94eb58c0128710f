"""One request's way through the engine and back, for completions and chat, streamed or not.

An endpoint builds the GenerationRequest (`open_request`: prompts, limits,
the extensions' hooks) and renders choices; this module does the rest:
submit the request, fold the engine's deltas into choices, ask the
extensions for their response fields, count usage, and serve the result
whole (`collect`) or as server-sent events (`sse`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from longserve.server.engine.base import EngineDead, EngineOverloaded, GenerationRequest, NeverFits, SeqDelta, TokenLogprob, Unsupported
from longserve.server.errors import APIError, error_body
from longserve.server.extensions import Extension
from longserve.server.extensions.beam import Beam
from longserve.server.extensions.keys import Keys
from longserve.server.extensions.nbce import Nbce
from longserve.server.extensions.position import Position
from longserve.server.extensions.structured import Structured
from longserve.server.extensions.tools import Tools
from longserve.server.log_ids import REQUEST_ID
from longserve.server.protocol import SamplingFields, check_length, now, random_id
from longserve.server.responses import PromptTokensDetails, Usage

T = TypeVar("T")

DISCONNECT_POLL_SECONDS = 0.25
log = logging.getLogger("longserve.requests")


def extensions_of(body: SamplingFields, state) -> list[Extension]:
    """The adapters of the extensions `body` uses (server/extensions/); none for a plain request."""
    used = []
    if body.position is not None:
        used.append(Position(body, state))
    if body.contexts is not None:
        used.append(Nbce(body, state))
    if body.constraint is not None:
        used.append(Keys(body, state))
    if body.structured_outputs is not None or getattr(body, "formatted", False):
        used.append(Structured(body, state))
    if getattr(body, "tools", None):
        used.append(Tools(body, state))
    if body.use_beam_search:  # last: it checks what the adapters above set
        used.append(Beam(body, state))
    return used


def check_lengths(prompts: list[list[int]], max_tokens: int, max_model_len: int, extensions: list[Extension]) -> None:
    for index, prompt in enumerate(prompts):
        which, param = "the prompt" if len(prompts) == 1 else f"prompt {index}", None
        for extension in extensions:
            which, param = extension.prompt_label(index) or (which, param)
        check_length(len(prompt), max_tokens, max_model_len, which, param)


async def start(raw: Request, body: SamplingFields, id_prefix: str, prompts: list[list[int]], params,
                extensions: list[Extension]) -> "ChoiceStream":
    """Convert `body` to the engine's request, let the extensions prepare it, and submit it."""
    request = body.to_generation_request(random_id(id_prefix), prompts, params)
    request.log_id = REQUEST_ID.get()

    async def prepare():
        for extension in extensions:
            await extension.prepare(request, raw.app.state)

    await unless_client_leaves(raw, prepare())  # a grammar whose client left stops compiling
    return ChoiceStream(raw, request, extensions)


class ClientLeft(APIError):
    def __init__(self):
        super().__init__(499, "client disconnected")


async def unless_client_leaves(raw: Request, work: Awaitable[T]) -> T:
    """`work`'s result; a client that goes away first cancels it (ClientLeft, a 499)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await raw.is_disconnected():
                raise ClientLeft()
    finally:
        if not task.done():
            task.cancel()


@dataclass
class Choice:
    """One choice as it accumulates; `text` and `logprobs` also as the latest delta brought them."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # of its prompt, read from the prefix cache


class ChoiceStream:
    """The choices of one submitted request."""

    def __init__(self, raw: Request, request: GenerationRequest, extensions: list[Extension]):
        self.raw, self.request, self.extensions = raw, request, extensions
        self.engine = raw.app.state.engine
        self.created = now()
        self.choices = [Choice(index=i) for i in range(request.num_choices)]
        self.deltas = self.submit()

    def submit(self) -> AsyncIterator[SeqDelta]:
        """Hand the request to the engine, logging ids and counts (the prompt text only with --log-prompts)."""
        request = self.request
        log.info("%s: %d prompt(s), %d prompt tokens, n %d, max_tokens %d", request.request_id, len(request.prompts),
                 sum(len(p) for p in request.prompts), request.n, request.params.max_tokens)
        if self.raw.app.state.settings.log_prompts:
            for index, prompt in enumerate(request.prompts):
                log.info("%s: prompt %d: %r", request.request_id, index, self.engine.tokenizer.decode(prompt))
        try:
            return self.engine.generate(request)
        except EngineOverloaded as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDead as exc:
            raise APIError(503, f"the engine is not running: {exc}") from None
        except (Unsupported, NeverFits) as exc:
            raise APIError(400, str(exc)) from None

    async def updates(self) -> AsyncIterator[tuple[Choice, SeqDelta]]:
        """Each delta, folded into its choice first; a delta that ends its choice with an error raises it."""
        async for delta in self.deltas:
            if delta.error:
                message = delta.error if delta.error_status == 503 else f"generation failed: {delta.error}"
                raise APIError(delta.error_status, message)
            choice = self.choices[delta.index]
            choice.text += delta.text
            choice.logprobs += delta.logprobs or []
            choice.prompt_logprobs += delta.prompt_logprobs or []
            choice.finish_reason = delta.finish_reason
            choice.completion_tokens = delta.completion_tokens
            choice.cached_tokens = max(choice.cached_tokens, delta.cached_tokens)
            for extension in self.extensions:
                extension.observe(delta)
            yield choice, delta

    def header(self) -> dict:
        """The fields every response object and stream event of this request starts with."""
        return {"id": self.request.request_id, "created": self.created, "model": self.engine.model_name}

    def fields(self, index: int, finished: bool) -> dict:
        """The extensions' response fields of choice `index` since the last call."""
        merged = {}
        for extension in self.extensions:
            merged.update(extension.fields(index, finished))
        return merged

    async def collect(self) -> list[Choice]:
        """Every choice, finished; a client that goes away first aborts the request (499)."""

        async def drain():
            async for _ in self.updates():
                pass

        try:
            await unless_client_leaves(self.raw, drain())
        except ClientLeft:
            self.abort()
            raise
        return self.choices

    def abort(self) -> None:
        self.engine.abort(self.request.request_id)

    def usage(self) -> Usage:
        """OpenAI's usage; cached_tokens counts prompt tokens the prefix cache served, once per prompt (its n
        choices share it: the most any of them read). Every NBCE row counts as a prompt."""
        prompt_tokens = sum(len(p) for p in self.request.prompts)
        completion_tokens = sum(c.completion_tokens for c in self.choices)
        n = self.request.n
        cached = [c.cached_tokens for c in self.choices]
        cached_tokens = sum(max(cached[i : i + n]) for i in range(0, len(cached), n))
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))

    def sse(self, events: AsyncIterator[BaseModel]) -> EventSourceResponse:
        """Serve `events` as `data: {json}` lines, then `data: [DONE]`; an error becomes an error event.
        The stream ending early (a client that went away) aborts the request."""

        async def lines():
            try:
                async for event in events:
                    yield {"data": event.model_dump_json(exclude_unset=True)}
            except APIError as exc:
                yield {"data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
            finally:
                self.abort()
            yield {"data": "[DONE]"}

            # "\n" line ends, as OpenAI and vLLM send them: sse-starlette's default "\r\n" is valid SSE, but clients that
        # split events on "\n\n" (vLLM's own benchmark client among them) lose events that share a read, usage included.
        # `ping` (--sse-ping-seconds): off by default, as OpenAI and vLLM send none; clients that strip each read before
        # splitting (vLLM's benchmark client) merge a lone ": ping" comment with the events after it and lose them.
        ping = self.raw.app.state.settings.sse_ping_seconds
        return EventSourceResponse(lines(), ping=ping or 10**9, sep="\n")
