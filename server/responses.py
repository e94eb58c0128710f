"""OpenAI's response objects, typed, with the extension fields declared: /openapi.json documents every field.

Declarations only. Every standard field is required, so the endpoints set
each one; the extension fields (nbce_context_ids; key, value and score) and
the fields OpenAI sends only sometimes default to None and are left out of
the JSON unless set (the routes and streams serialize with exclude_unset), so
a plain request gets exactly OpenAI's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ExtensionChoiceFields(BaseModel):
    """A choice's extension fields, in full responses and, as they arrive, in stream chunks."""

    nbce_context_ids: list[int] | None = Field(None, description="NBCE (contexts): the context, 0-based, each token came from")
    key: str | None = Field(None, description="constraint: the knowledge-base key written, once complete (null if none)")
    value: Any = Field(None, description="constraint: the value stored with that key")
    score: float | None = Field(None, description="use_beam_search (under a constraint or a grammar): the answer's cumulative log-probability")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens read from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ExtensionChoiceFields):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A completion, and each event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="streams: null in every event, and set in a last one, with include_usage")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str | None = Field(None, description="streams: in a call's first piece only")
    arguments: str = Field(description="JSON text, valid under the tool's parameters when tool_choice forced the call")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is tool calls only")
    tool_calls: list[ToolCall] | None = Field(None, description="tools: the calls the model made")


class ChatChoice(ExtensionChoiceFields):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="the first chunk of each choice only")
    content: str | None = Field(None, description="left out of a chunk that brings no text")
    tool_calls: list[ToolCallDelta] | None = Field(None, description="tools: the calls, once the choice ends")


class ChatStreamChoice(ExtensionChoiceFields):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = Field(None, description="null in every chunk, and set in a last one, with include_usage")


STREAM_EVENTS = {"/v1/completions": CompletionResponse, "/v1/chat/completions": ChatCompletionChunk}
