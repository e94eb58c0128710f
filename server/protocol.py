"""OpenAI request and response models, with vLLM's common extensions and longserve's own.

Each request model converts itself to the engine's GenerationRequest
(`to_generation_request`); the extensions' adapters (server/extensions/) then
set their own engine fields. The responses are in server/responses.py.

Requests forbid unknown fields: a misspelt parameter gets a 400 that names
it, instead of being silently ignored. Ranges follow OpenAI's documentation.
Every number has a bound and no float may be NaN or infinite, so nothing a
client sends can overflow a tensor; every string must be valid Unicode
(valid_text.py). The bounds are the constants below.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from longserve.patches.nbce import NbceParams
from longserve.patches.rope import PositionSpec
from longserve.server.engine.base import GenerationRequest, SamplingParams
from longserve.server.errors import APIError
from longserve.server.protocol_structured import MAX_TOOLS, NamedToolChoice, ResponseFormat, StrictModel, StructuredOutputs, Tool
from longserve.server.valid_text import check_text

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_INT32 = 2**31 - 1  # max_tokens and top_k: far past any real value, and safe for any tensor
MAX_LOGIT_BIAS = 1024  # entries
MAX_STOP_TOKEN_IDS = 1024
MAX_INLINE_CHOICES = 100_000  # constraint.choices; larger sets belong in a registered trie
MAX_CONTEXTS = 4096  # the upper bound of --max-contexts
MIN_REPETITION_PENALTY = 0.01  # below it a seen logit divided by the penalty overflows float32
TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: str.isdigit() also takes '²'


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class RequestBody(StrictModel):
    """A whole request body: checked for invalid Unicode once, before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data):
        return check_text(data)


class StreamOptions(StrictModel):
    include_usage: bool = False


class Constraint(StrictModel):
    """Answers restricted to keys: of a registered trie, or of an inline list."""

    trie: str | None = None
    choices: list[str] | None = Field(None, min_length=1, max_length=MAX_INLINE_CHOICES)
    lead: str = Field("", max_length=8, description="inline choices: text the model writes before a key")

    @model_validator(mode="after")
    def one_source(self):
        if (self.trie is None) == (self.choices is None):
            raise ValueError('give exactly one of "trie" (a registered name) or "choices" (a list of strings)')
        if self.trie is not None and self.lead:
            raise ValueError("a registered trie has its own lead; set lead when you register it")
        return self


# The rule for stop strings under a grammar: refused. A stop string ends the text where it appears, so it would cut
# the JSON (or tool call) the grammar promises and answer it with finish_reason "stop", as if whole; the grammar
# already ends the text where it is complete.
STOP_UNDER_A_GRAMMAR = ("stop cannot be combined with {what}: a stop string would cut the output the grammar "
                        "promises, and the grammar ends the output where it is complete; leave out stop")


class SamplingFields(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    # vLLM extensions
    top_k: int = Field(0, ge=-1, le=MAX_INT32)
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    # longserve extension: position scaling for this request only
    position: PositionSpec | None = None
    # longserve extension: NBCE, one answer decoded over many contexts
    contexts: list[str] | None = Field(None, max_length=MAX_CONTEXTS)
    nbce: NbceParams | None = None
    # longserve extension: the answer must be a key of a knowledge base
    constraint: Constraint | None = None
    use_beam_search: bool = False  # vLLM's name; here with a constraint or a grammar: n = the beam width
    # vLLM's structured outputs: the text must match a JSON schema, regex, choice or grammar
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def check_logit_bias(cls, value):
        for key, bias in (value or {}).items():
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must lie in [-100, 100]; got {bias} for token {key}")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        logit_bias = {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        check_token_ids(list(logit_bias), vocab_size, "logit_bias")
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=logit_bias,
        )

    def to_generation_request(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> GenerationRequest:
        """The engine's request, before the extensions set their fields (server/extensions/)."""
        return GenerationRequest(request_id, prompts, params, self.n)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def check_contexts(self):
        if self.nbce is not None and self.contexts is None:
            raise ValueError("nbce settings need contexts: give the list of context strings")
        if self.contexts is not None and self.n != 1:
            raise ValueError("n > 1 is not supported with contexts; send n = 1")
        if self.contexts is not None and self.constraint is not None:
            raise ValueError("contexts and constraint cannot be combined; send one of them")
        if self.structured_outputs is not None and (self.contexts is not None or self.constraint is not None):
            raise ValueError("structured_outputs cannot be combined with contexts or constraint; send one of them")
        if self.structured_outputs is not None and self.stop:
            raise ValueError(STOP_UNDER_A_GRAMMAR.format(what="structured_outputs"))
        return self

    @field_validator("contexts")
    @classmethod
    def check_contexts_given(cls, value):
        if value is not None and not value:
            raise ValueError("contexts is empty; give at least one context string, or leave contexts out")
        return value


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT32)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def check_unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def check_tool_turns(self):
        """A malformed history is the client's mistake: a 400 naming it, before a chat template reads it."""
        for index, call in enumerate(self.tool_calls or []):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"tool_calls[{index}] needs a function with a name: "
                                 '{"id": "call_1", "type": "function", "function": {"name": "...", "arguments": "{...}"}}')
            if not isinstance(function.get("arguments", "{}"), (str, dict)):
                raise ValueError(f"tool_calls[{index}].function.arguments must be JSON text (or an object)")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id: the id of the call whose result it carries")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.formatted and self.structured_outputs is not None:
            raise ValueError("response_format and structured_outputs both shape the output; send one of them")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools: list the functions the model may call")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not one of the tools")
        forced = self.tools and self.tool_choice not in (None, "none", "auto")
        if forced and (self.formatted or self.structured_outputs is not None):
            raise ValueError("a required or named tool_choice shapes the output itself; leave out response_format and structured_outputs")
        if (self.tools or self.formatted) and (self.contexts is not None or self.constraint is not None):
            raise ValueError("tools and response_format cannot be combined with contexts or constraint; send one of them")
        if self.stop and (forced or self.formatted):
            raise ValueError(STOP_UNDER_A_GRAMMAR.format(what="a required or named tool_choice" if forced else "response_format"))
        return self

    @property
    def formatted(self) -> bool:
        """response_format asks for JSON."""
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprob_count(self) -> int | None:
        """The engine's `logprobs`: None without logprobs, else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]



def now() -> int:
    return int(time.time())


# Checks against the served model's limits: the request is valid JSON, but this server cannot take it.


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {served!r}", "model", "model_not_found")


def check_length(prompt_len: int, max_tokens: int, max_model_len: int, which: str = "the prompt", param: str | None = None) -> None:
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
