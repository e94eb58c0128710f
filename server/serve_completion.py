"""POST /v1/completions: prompts in, text out, streamed or not."""

from __future__ import annotations

from fastapi import Request

from server.engine.base import GenerationRequest, SeqDelta, TokenLogprob
from server.errors import APIError
from server.protocol import CompletionRequest, now, random_id
from server.serve_nbce import check_context_count, check_rows, completion_rows, nbce_params
from server.serve_tries import key_constraint, key_fields
from server.serving import (
    check_length,
    check_model,
    Choice,
    check_token_ids,
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


def tokenize_prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


def completion_logprobs(records: list[TokenLogprob], tokenizer, start_offset: int, first_prompt_token: int | None = None) -> dict:
    """OpenAI's completion logprobs; with echo, the prompt's first token leads with null scores."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    if first_prompt_token is not None:
        text = token_text(tokenizer, first_prompt_token)
        tokens.append(text)
        token_logprobs.append(None)
        top_logprobs.append(None)
        offsets.append(offset)
        offset += len(text)
    for record in records:
        text = token_text(tokenizer, record.token_id)
        tokens.append(text)
        token_logprobs.append(record.logprob)
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in record.top} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def create_completion(body: CompletionRequest, raw: Request):
    state = raw.app.state
    engine = state.engine
    check_model(body.model, engine.model_name)
    vocab_size = len(engine.tokenizer)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 is only allowed with echo: true (to score the prompt)", "max_tokens")
    nbce = None
    if body.contexts is not None:
        if body.echo:
            raise APIError(400, "echo is not supported with contexts: the rows have different prompts", "echo")
        check_context_count(body, state.settings.max_contexts, engine.max_num_seqs)
        prompts, nbce = completion_rows(body.prompt, body.contexts, engine.tokenizer), nbce_params(body)
        check_rows(prompts, max_tokens, engine.max_model_len)
    else:
        prompts = tokenize_prompts(body, engine.tokenizer)
        for index, ids in enumerate(prompts):
            check_token_ids(ids, vocab_size, "prompt")
            check_length(len(ids), max_tokens, engine.max_model_len, index if len(prompts) > 1 else None)
    params = sampling_params(body, max_tokens, body.logprobs, vocab_size)
    if body.echo and body.logprobs is not None:
        params.prompt_logprobs = body.logprobs
    constraint, base = await key_constraint(raw, body.constraint, body.n if body.use_beam_search else None)
    request = GenerationRequest(random_id("cmpl"), prompts, params, body.n, position=body.position, nbce=nbce, constraint=constraint,
                                beam_search=body.use_beam_search)
    stream = submit(raw, request)
    created = now()
    model = engine.model_name
    prompt_lengths = [len(p) for p in prompts]

    if body.stream:
        chunks = stream_chunks(body, request, stream, engine, created, prompt_lengths, base)
        return sse_response(chunks, lambda: engine.abort(request.request_id), raw.app.state.settings.sse_ping_seconds)

    choices = await until_disconnect(raw, collect(stream, request.num_choices), lambda: engine.abort(request.request_id))
    return {
        "id": request.request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{**choice_body(body, c, prompts[c.index // body.n], engine.tokenizer), **key_fields(base, c.entry, c.score)} for c in choices],
        "usage": usage(prompt_lengths, sum(c.completion_tokens for c in choices),
                       cached_per_prompt([c.cached_tokens for c in choices], request.n)),
    }


def with_echo(prompt: list[int], prompt_records: list[TokenLogprob], text: str, records: list[TokenLogprob], tokenizer):
    """Prepend the prompt (text and scores) to a choice's first output; returns (text, records, first prompt token)."""
    return tokenizer.decode(prompt) + text, prompt_records + records, prompt[0]


def choice_body(body: CompletionRequest, choice: Choice, prompt: list[int], tokenizer) -> dict:
    text, records, first_prompt_token = choice.text, choice.logprobs, None
    if body.echo:
        text, records, first_prompt_token = with_echo(prompt, choice.prompt_logprobs, text, records, tokenizer)
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(records, tokenizer, 0, first_prompt_token)
    entry = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
    if body.contexts is not None:
        entry["nbce_context_ids"] = choice.context_ids
    return entry


async def stream_chunks(body: CompletionRequest, request: GenerationRequest, stream, engine, created: int, prompt_lengths, base=None):
    offsets = [0] * request.num_choices
    completion_tokens = [0] * request.num_choices
    cached_tokens = [0] * request.num_choices
    echoed = [not body.echo] * request.num_choices
    context_ids: list[list[int]] = [[] for _ in range(request.num_choices)]  # NBCE: not yet sent
    delta: SeqDelta
    async for delta in stream:
        raise_for_error(delta)
        index = delta.index
        completion_tokens[index] = delta.completion_tokens
        cached_tokens[index] = max(cached_tokens[index], delta.cached_tokens)
        context_ids[index] += delta.context_ids or []
        text, records, first_prompt_token = delta.text, delta.logprobs or [], None
        if not echoed[index]:  # the prompt leads the first chunk of each choice
            echoed[index] = True
            prompt = request.prompts[index // request.n]
            text, records, first_prompt_token = with_echo(prompt, delta.prompt_logprobs or [], text, records, engine.tokenizer)
        elif not text and delta.finish_reason is None and not records:
            continue  # a token that ends mid-character: its text comes with the next one
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(records, engine.tokenizer, offsets[index], first_prompt_token)
        offsets[index] += len(text)
        chunk = {
            "id": request.request_id,
            "object": "text_completion",
            "created": created,
            "model": engine.model_name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}],
        }
        if body.contexts is not None:
            chunk["choices"][0]["nbce_context_ids"], context_ids[index] = context_ids[index], []
        if delta.finish_reason is not None:
            chunk["choices"][0].update(key_fields(base, delta.entry, delta.score))
        if body.include_usage:
            chunk["usage"] = None
        yield chunk
    if body.include_usage:
        yield {
            "id": request.request_id,
            "object": "text_completion",
            "created": created,
            "model": engine.model_name,
            "choices": [],
            "usage": usage(prompt_lengths, sum(completion_tokens), cached_per_prompt(cached_tokens, request.n)),
        }
