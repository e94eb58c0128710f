"""POST /v1/chat/completions: messages through the tokenizer's chat template."""

from __future__ import annotations

from fastapi import Request

from server.engine.base import GenerationRequest, TokenLogprob
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessage, now, random_id
from server.serve_nbce import chat_rows, check_context_count, check_rows, nbce_params
from server.serve_tries import key_constraint, key_fields
from server.serving import (
    check_length,
    check_model,
    collect,
    raise_for_error,
    sampling_params,
    sse_response,
    submit,
    token_text,
    until_disconnect,
    cached_per_prompt,
    usage,
)


def chat_prompt_ids(messages: list[ChatMessage], tokenizer, add_generation_prompt: bool = True) -> list[int]:
    try:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from None
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # a template may reject a role order, say
        raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(records: list[TokenLogprob], tokenizer) -> dict:
    content = []
    for record in records:
        entry = token_entry(tokenizer, record.token_id, record.logprob)
        entry["top_logprobs"] = [token_entry(tokenizer, t, lp) for t, lp in record.top]
        content.append(entry)
    return {"content": content}


async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
    engine = raw.app.state.engine
    check_model(body.model, engine.model_name)
    nbce = None
    if body.contexts is not None:
        check_context_count(body, raw.app.state.settings.max_contexts, engine.max_num_seqs)
        rows = chat_rows(body.messages, body.contexts)
        prompts = [chat_prompt_ids(messages, engine.tokenizer, body.add_generation_prompt) for messages in rows]
        max_tokens = body.token_limit or max(1, engine.max_model_len - max(len(p) for p in prompts))
        check_rows(prompts, max_tokens, engine.max_model_len)
        nbce = nbce_params(body)
    else:
        prompts = [chat_prompt_ids(body.messages, engine.tokenizer, body.add_generation_prompt)]
        max_tokens = body.token_limit or max(1, engine.max_model_len - len(prompts[0]))
        check_length(len(prompts[0]), max_tokens, engine.max_model_len)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, len(engine.tokenizer))
    constraint, base = await key_constraint(raw, body.constraint, body.n if body.use_beam_search else None)
    request = GenerationRequest(random_id("chatcmpl"), prompts, params, body.n, position=body.position, nbce=nbce, constraint=constraint,
                                beam_search=body.use_beam_search)
    prompt_lengths = [len(p) for p in prompts]  # usage counts every NBCE row
    stream = submit(raw, request)
    created = now()
    abort = lambda: engine.abort(request.request_id)  # noqa: E731

    if body.stream:
        return sse_response(stream_chunks(body, request, stream, engine, created, prompt_lengths, base), abort,
                            raw.app.state.settings.sse_ping_seconds)

    choices = await until_disconnect(raw, collect(stream, request.num_choices), abort)
    return {
        "id": request.request_id,
        "object": "chat.completion",
        "created": created,
        "model": engine.model_name,
        "choices": [{**choice_body(body, c, engine.tokenizer), **key_fields(base, c.entry, c.score)} for c in choices],
        "usage": usage(prompt_lengths, sum(c.completion_tokens for c in choices),
                       cached_per_prompt([c.cached_tokens for c in choices], request.n)),
    }


def choice_body(body: ChatCompletionRequest, choice, tokenizer) -> dict:
    entry = {
        "index": choice.index,
        "message": {"role": "assistant", "content": choice.text},
        "logprobs": chat_logprobs(choice.logprobs, tokenizer) if body.logprobs else None,
        "finish_reason": choice.finish_reason,
    }
    if body.contexts is not None:
        entry["nbce_context_ids"] = choice.context_ids
    return entry


async def stream_chunks(body: ChatCompletionRequest, request: GenerationRequest, stream, engine, created: int,
                        prompt_lengths: list[int], base=None):
    def chunk(choices: list[dict]) -> dict:
        event = {"id": request.request_id, "object": "chat.completion.chunk", "created": created, "model": engine.model_name, "choices": choices}
        if body.include_usage:
            event["usage"] = None
        return event

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(request.num_choices)])
    completion_tokens = [0] * request.num_choices
    cached_tokens = [0] * request.num_choices
    context_ids: list[list[int]] = [[] for _ in range(request.num_choices)]  # NBCE: not yet sent
    async for delta in stream:
        raise_for_error(delta)
        completion_tokens[delta.index] = delta.completion_tokens
        cached_tokens[delta.index] = max(cached_tokens[delta.index], delta.cached_tokens)
        context_ids[delta.index] += delta.context_ids or []
        logprobs = chat_logprobs(delta.logprobs or [], engine.tokenizer) if body.logprobs else None
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            continue  # a token that ends mid-character: its text comes with the next one
        content = {"content": delta.text} if delta.text else {}
        entry = {"index": delta.index, "delta": content, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        if body.contexts is not None:
            entry["nbce_context_ids"], context_ids[delta.index] = context_ids[delta.index], []
        if delta.finish_reason is not None:
            entry.update(key_fields(base, delta.entry, delta.score))
        yield chunk([entry])
    if body.include_usage:
        final = chunk([])
        final["usage"] = usage(prompt_lengths, sum(completion_tokens), cached_per_prompt(cached_tokens, request.n))
        yield final
