"""POST /v1/completions: prompts in, text out, streamed or not."""

from __future__ import annotations

import asyncio

from fastapi import Request

from longserve.server.bounded_tokenizer import BoundedTokenizer
from longserve.server.choice_stream import Choice, ChoiceStream, check_lengths, extensions_of, start
from longserve.server.engine.base import TokenLogprob
from longserve.server.errors import APIError
from longserve.server.protocol import CompletionRequest, check_model, check_token_ids
from longserve.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse


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


def prompts_of(body: CompletionRequest, tokenizer, extensions, vocab_size: int) -> list[list[int]]:
    """The token ids of each prompt: an extension's (NBCE's contexts), or the prompts as sent."""
    prompts = next((p for e in extensions if (p := e.prompts(body.prompt, tokenizer))), None)
    if prompts is not None:
        return prompts
    prompts = tokenize_prompts(body, tokenizer)
    for ids in prompts:
        check_token_ids(ids, vocab_size, "prompt")
    return prompts


def completion_logprobs(records: list[TokenLogprob], tokenizer, start_offset: int,
                        first_prompt_token: int | None = None) -> CompletionLogprobs:
    """OpenAI's completion logprobs; with echo, the prompt's first token leads with null scores."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset

    def add(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        nonlocal offset
        text = tokenizer.decode([token_id])
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(logprob)
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(offset)
        offset += len(text)

    if first_prompt_token is not None:
        add(first_prompt_token, None, None)
    for record in records:
        add(record.token_id, record.logprob, {tokenizer.decode([t]): lp for t, lp in record.top} or None)
    return logprobs


async def create_completion(body: CompletionRequest, raw: Request) -> CompletionResponse:
    engine = raw.app.state.engine
    check_model(body.model, engine.model_name)
    vocab_size = len(engine.tokenizer)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 is only allowed with echo: true (to score the prompt)", "max_tokens")
    extensions = extensions_of(body, raw.app.state)
    # in a worker thread: 15 NBCE contexts of 1 MB took seconds to tokenize, which held every stream
    tokenizer = BoundedTokenizer(engine.tokenizer, engine.max_model_len, "prompt")
    prompts = await asyncio.to_thread(prompts_of, body, tokenizer, extensions, vocab_size)
    check_lengths(prompts, max_tokens, engine.max_model_len, extensions)
    params = body.sampling_params(max_tokens, body.logprobs, vocab_size)
    if body.echo and body.logprobs is not None:
        params.prompt_logprobs = body.logprobs
    stream = await start(raw, body, "cmpl", prompts, params, extensions)
    if body.stream:
        return stream.sse(chunks(body, stream))
    choices = [choice_body(body, stream, c) for c in await stream.collect()]
    return CompletionResponse(object="text_completion", **stream.header(), choices=choices, usage=stream.usage())


def with_echo(prompt: list[int], prompt_records: list[TokenLogprob], text: str, records: list[TokenLogprob], tokenizer):
    """Prepend the prompt (text and scores) to a choice's first output; returns (text, records, first prompt token)."""
    return tokenizer.decode(prompt) + text, prompt_records + records, prompt[0]


def choice_body(body: CompletionRequest, stream: ChoiceStream, choice: Choice) -> CompletionChoice:
    tokenizer = stream.engine.tokenizer
    text, records, first_prompt_token = choice.text, choice.logprobs, None
    if body.echo:
        prompt = stream.request.prompts[choice.index // body.n]
        text, records, first_prompt_token = with_echo(prompt, choice.prompt_logprobs, text, records, tokenizer)
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(records, tokenizer, 0, first_prompt_token)
    return CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=choice.finish_reason,
                            **stream.fields(choice.index, finished=True))


async def chunks(body: CompletionRequest, stream: ChoiceStream):
    tokenizer = stream.engine.tokenizer
    offsets = [0] * len(stream.choices)
    echoed = [not body.echo] * len(stream.choices)
    usage = {"usage": None} if body.include_usage else {}
    async for choice, delta in stream.updates():
        index = choice.index
        text, records, first_prompt_token = delta.text, delta.logprobs or [], None
        if not echoed[index]:  # the prompt leads the first chunk of each choice
            echoed[index] = True
            prompt = stream.request.prompts[index // stream.request.n]
            text, records, first_prompt_token = with_echo(prompt, delta.prompt_logprobs or [], text, records, tokenizer)
        elif not text and delta.finish_reason is None and not records and not delta.token_ids:
            continue  # nothing new; a token without text of its own (a special token, part of a character) is sent
            # as an empty chunk, as vLLM sends it: a client's first chunk is its first token, whatever its text
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(records, tokenizer, offsets[index], first_prompt_token)
        offsets[index] += len(text)
        piece = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                 **stream.fields(index, finished=delta.finish_reason is not None))
        yield CompletionResponse(object="text_completion", **stream.header(), choices=[piece], **usage)
    if body.include_usage:
        yield CompletionResponse(object="text_completion", **stream.header(), choices=[], usage=stream.usage())
