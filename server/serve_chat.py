"""POST /v1/chat/completions: messages through the tokenizer's chat template; choices as messages or deltas."""

from __future__ import annotations

from fastapi import Request

from server.choice_stream import Choice, ChoiceStream, check_lengths, extensions_of, start
from server.engine.base import TokenLogprob
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessage, check_model
from server.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    TopLogprob,
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


def top_logprob(tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = tokenizer.decode([token_id])
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(records: list[TokenLogprob], tokenizer) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(**dict(top_logprob(tokenizer, r.token_id, r.logprob)),
                         top_logprobs=[top_logprob(tokenizer, t, lp) for t, lp in r.top])
        for r in records
    ])


async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> ChatCompletionResponse:
    engine = raw.app.state.engine
    check_model(body.model, engine.model_name)
    extensions = extensions_of(body, raw.app.state)
    conversations = next((c for e in extensions if (c := e.conversations(body.messages))), [body.messages])
    prompts = [chat_prompt_ids(messages, engine.tokenizer, body.add_generation_prompt) for messages in conversations]
    max_tokens = body.token_limit or max(1, engine.max_model_len - max(len(p) for p in prompts))
    check_lengths(prompts, max_tokens, engine.max_model_len, extensions)
    params = body.sampling_params(max_tokens, body.top_logprob_count, len(engine.tokenizer))
    stream = await start(raw, body, "chatcmpl", prompts, params, extensions)
    if body.stream:
        return stream.sse(chunks(body, stream))
    choices = [choice_body(body, stream, c) for c in await stream.collect()]
    return ChatCompletionResponse(object="chat.completion", **stream.header(), choices=choices, usage=stream.usage())


def choice_body(body: ChatCompletionRequest, stream: ChoiceStream, choice: Choice) -> ChatChoice:
    logprobs = chat_logprobs(choice.logprobs, stream.engine.tokenizer) if body.logprobs else None
    return ChatChoice(index=choice.index, message=ChatResponseMessage(role="assistant", content=choice.text),
                      logprobs=logprobs, finish_reason=choice.finish_reason, **stream.fields(choice.index, finished=True))


async def chunks(body: ChatCompletionRequest, stream: ChoiceStream):
    def chunk(choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
        usage = {"usage": None} if body.include_usage else {}
        return ChatCompletionChunk(object="chat.completion.chunk", **stream.header(), choices=choices, **usage)

    yield chunk([ChatStreamChoice(index=c.index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                  finish_reason=None) for c in stream.choices])
    async for choice, delta in stream.updates():
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            continue  # a token that ends mid-character: its text comes with the next one
        logprobs = chat_logprobs(delta.logprobs or [], stream.engine.tokenizer) if body.logprobs else None
        content = ChatDelta(content=delta.text) if delta.text else ChatDelta()
        yield chunk([ChatStreamChoice(index=choice.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason,
                                      **stream.fields(choice.index, finished=delta.finish_reason is not None))])
    if body.include_usage:
        final = chunk([])
        final.usage = stream.usage()
        yield final
