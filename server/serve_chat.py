"""POST /v1/chat/completions: messages through the tokenizer's chat template; choices as messages or deltas."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

from longserve.server.bounded_tokenizer import BoundedTokenizer
from longserve.server.choice_stream import Choice, ChoiceStream, check_lengths, extensions_of, start
from longserve.server.engine.base import TokenLogprob
from longserve.server.errors import APIError
from longserve.server.protocol import ChatCompletionRequest, ChatMessage, check_model
from longserve.server.extensions.tools import call_id
from longserve.server.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)


def template_turn(message: ChatMessage) -> dict:
    """One message as chat templates read it; a call's arguments (JSON text in OpenAI's shape) become an object."""
    turn = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        turn["tool_calls"] = [{**call, "function": {**call.get("function", {}), "arguments": as_object(call.get("function", {}).get("arguments"))}}
                              for call in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def as_object(arguments):
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def chat_prompt_ids(messages: list[ChatMessage], tokenizer, add_generation_prompt: bool = True, extensions=()) -> list[int]:
    try:
        conversation = [template_turn(m) for m in messages]
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from None
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    template_args = {}
    for extension in extensions:
        conversation = extension.template_conversation(conversation)
        template_args.update(extension.template_args())
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **template_args)
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
    # in a worker thread: a 16 MiB conversation takes seconds to template and tokenize, which held every stream
    tokenizer = BoundedTokenizer(engine.tokenizer, engine.max_model_len, "messages")
    prompts = await asyncio.to_thread(lambda: [chat_prompt_ids(messages, tokenizer, body.add_generation_prompt, extensions)
                                               for messages in conversations])
    max_tokens = body.token_limit or max(1, engine.max_model_len - max(len(p) for p in prompts))
    check_lengths(prompts, max_tokens, engine.max_model_len, extensions)
    params = body.sampling_params(max_tokens, body.top_logprob_count, len(engine.tokenizer))
    stream = await start(raw, body, "chatcmpl", prompts, params, extensions)
    if body.stream:
        return stream.sse(chunks(body, stream))
    choices = [choice_body(body, stream, c) for c in await stream.collect()]
    return ChatCompletionResponse(object="chat.completion", **stream.header(), choices=choices, usage=stream.usage())


def tool_calls(calls: list[dict]) -> list[ToolCall]:
    return [ToolCall(id=call_id(), type="function", function=FunctionCall(**call)) for call in calls]


def choice_body(body: ChatCompletionRequest, stream: ChoiceStream, choice: Choice) -> ChatChoice:
    logprobs = chat_logprobs(choice.logprobs, stream.engine.tokenizer) if body.logprobs else None
    content, calls = choice.text, []
    for extension in stream.extensions:
        content, calls = extension.message(choice.text, choice.finish_reason) or (content, calls)
    message = ChatResponseMessage(role="assistant", content=content, **({"tool_calls": tool_calls(calls)} if calls else {}))
    return ChatChoice(index=choice.index, message=message, logprobs=logprobs,
                      finish_reason="tool_calls" if calls and choice.finish_reason == "stop" else choice.finish_reason,
                      **stream.fields(choice.index, finished=True))


async def chunks(body: ChatCompletionRequest, stream: ChoiceStream):
    def chunk(choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
        usage = {"usage": None} if body.include_usage else {}
        return ChatCompletionChunk(object="chat.completion.chunk", **stream.header(), choices=choices, **usage)

    started = False
    async for choice, delta in stream.updates():
        if not started:  # the role with the first token, as vLLM sends it: a client's first chunk is its first token
            started = True
            yield chunk([ChatStreamChoice(index=c.index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                          finish_reason=None) for c in stream.choices])
        text, calls, finish_reason = delta.text, [], delta.finish_reason
        for extension in stream.extensions:
            text = extension.stream_text(choice.index, text)
        if finish_reason is not None:
            for extension in stream.extensions:
                held, calls = extension.flush(choice.index, choice.text, finish_reason)
                text += held
        if not text and finish_reason is None and not delta.logprobs:
            continue  # a token that ends mid-character (or is held back): its text comes with a later one
        logprobs = chat_logprobs(delta.logprobs or [], stream.engine.tokenizer) if body.logprobs else None
        content = ChatDelta(content=text) if text else ChatDelta()
        if calls:
            content.tool_calls = [ToolCallDelta(index=i, id=c.id, type="function", function=c.function)
                                  for i, c in enumerate(tool_calls(calls))]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason  # "length": whole calls of a cut list
        yield chunk([ChatStreamChoice(index=choice.index, delta=content, logprobs=logprobs, finish_reason=finish_reason,
                                      **stream.fields(choice.index, finished=finish_reason is not None))])
    if body.include_usage:
        final = chunk([])
        final.usage = stream.usage()
        yield final
