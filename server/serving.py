"""What the completion and chat endpoints share: checks, submission, collection, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from sse_starlette import EventSourceResponse

from server.engine.base import (
    EngineDead,
    EngineOverloaded,
    GenerationRequest,
    NeverFits,
    SamplingParams,
    SeqDelta,
    TokenLogprob,
    Unsupported,
)
from server.errors import APIError, error_body
from server.protocol import SamplingFields

DISCONNECT_POLL_SECONDS = 0.25
log = logging.getLogger("longserve.requests")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {served!r}", "model", "model_not_found")


def check_length(prompt_len: int, max_tokens: int, max_model_len: int, index: int | None = None,
                 which: str | None = None, param: str | None = None) -> None:
    which = which or ("the prompt" if index is None else f"prompt {index}")
    if prompt_len == 0:
        raise APIError(400, f"{which} is empty; give at least one token", param or "prompt")
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"{which} has {prompt_len} tokens and max_tokens is {max_tokens}: together {prompt_len + max_tokens}, "
            f"over this server's max_model_len of {max_model_len}. Shorten the prompt or lower max_tokens.",
            param or "max_tokens",
        )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise APIError(400, f"{param} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", param)


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
    logit_bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    check_token_ids(list(logit_bias), vocab_size, "logit_bias")
    check_token_ids(body.stop_token_ids, vocab_size, "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        seed=body.seed,
        stop=body.stop_list,
        stop_token_ids=list(body.stop_token_ids),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=logit_bias,
    )


def submit(raw: Request, request: GenerationRequest) -> AsyncIterator[SeqDelta]:
    """Hand `request` to the engine, logging ids and counts (the prompt text only with --log-prompts)."""
    engine = raw.app.state.engine
    log.info("%s: %d prompt(s), %d prompt tokens, n %d, max_tokens %d", request.request_id, len(request.prompts),
             sum(len(p) for p in request.prompts), request.n, request.params.max_tokens)
    if raw.app.state.settings.log_prompts:
        for index, prompt in enumerate(request.prompts):
            log.info("%s: prompt %d: %r", request.request_id, index, engine.tokenizer.decode(prompt))
    try:
        return engine.generate(request)
    except EngineOverloaded as exc:
        raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineDead as exc:
        raise APIError(503, f"the engine is not running: {exc}") from None
    except (Unsupported, NeverFits) as exc:
        raise APIError(400, str(exc)) from None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    context_ids: list[int] = field(default_factory=list)  # NBCE: the context each token came from
    entry: int | None = None  # constrained: the knowledge-base entry of the finished key
    score: float | None = None  # beam search: the key's cumulative log-probability
    cached_tokens: int = 0  # of its prompt, read from the prefix cache


def raise_for_error(delta: SeqDelta) -> None:
    """A delta that ends its choice with an error becomes the request's APIError."""
    if delta.error:
        message = delta.error if delta.error_status == 503 else f"generation failed: {delta.error}"
        raise APIError(delta.error_status, message)


async def collect(stream: AsyncIterator[SeqDelta], num_choices: int) -> list[Choice]:
    choices = [Choice(index=i) for i in range(num_choices)]
    async for delta in stream:
        raise_for_error(delta)
        choice = choices[delta.index]
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        choice.logprobs += delta.logprobs or []
        choice.prompt_logprobs += delta.prompt_logprobs or []
        choice.context_ids += delta.context_ids or []
        choice.entry = delta.entry if delta.entry is not None else choice.entry
        choice.score = delta.score if delta.score is not None else choice.score
        choice.finish_reason = delta.finish_reason
        choice.completion_tokens = delta.completion_tokens
        choice.cached_tokens = max(choice.cached_tokens, delta.cached_tokens)
    return choices


async def until_disconnect(raw: Request, work: Awaitable, on_disconnect: Callable[[], None]):
    """Await `work`; if the client goes away first, cancel it and call on_disconnect."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                on_disconnect()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def usage(prompt_lengths: list[int], choices_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens counts prompt tokens the prefix cache served."""
    prompt_tokens = sum(prompt_lengths)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": choices_tokens, "total_tokens": prompt_tokens + choices_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_per_prompt(cached: list[int], n: int) -> int:
    """Prompt tokens served from the cache, once per prompt (its n choices share it): the most any choice read."""
    return sum(max(cached[i : i + n]) for i in range(0, len(cached), n))


def sse_response(events: AsyncIterator[dict], on_close: Callable[[], None], ping: float | None = None) -> EventSourceResponse:
    """Serve `events` as `data: {json}` lines, then `data: [DONE]`; errors become an error event."""

    async def lines():
        try:
            async for event in events:
                yield {"data": json.dumps(event, ensure_ascii=False)}
        except APIError as exc:
            yield {"data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
        finally:
            on_close()
        yield {"data": "[DONE]"}

    # "\n" line ends, as OpenAI and vLLM send them: sse-starlette's default "\r\n" is valid SSE, but clients that
    # split events on "\n\n" (vLLM's own benchmark client among them) lose events that share a read, usage included.
    # `ping` (--sse-ping-seconds): off by default, as OpenAI and vLLM send none; clients that strip each read before
    # splitting (vLLM's benchmark client) merge a lone ": ping" comment with the events after it and lose them.
    return EventSourceResponse(lines(), ping=ping or 10**9, sep="\n")


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])
