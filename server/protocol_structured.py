"""Request models of structured outputs and tool calls (server/extensions/structured.py and tools.py use them).

Like every request model, they forbid unknown fields and non-finite numbers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_GRAMMAR_CHARS = 1_000_000  # a regex or EBNF grammar; schemas are bounded by --max-body-bytes
MAX_STRUCTURED_CHOICES = 10_000  # structured_outputs.choice; larger sets belong in a registered trie
MAX_TOOLS = 128


class StrictModel(BaseModel):
    """A request model: unknown fields and NaN or infinite numbers are errors (protocol.py's models too)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: exactly one of json (a JSON schema), regex, choice, grammar (EBNF) or
    structural_tag (xgrammar's structural tag, as JSON text)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema, as an object or its text")
    regex: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_STRUCTURED_CHOICES)
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS, description="EBNF, as xgrammar reads it")
    structural_tag: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS,
                                       description="xgrammar's structural tag as JSON text: {\"type\": \"structural_tag\", "
                                                   "\"format\": ...}, or the older {\"structures\": [...], \"triggers\": [...]}")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [name for name in ("json_", "regex", "choice", "grammar", "structural_tag") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or structural_tag")
        return self

    @property
    def json(self):  # vLLM's name for the schema
        return self.json_


class JsonSchemaFormat(StrictModel):
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema goes with type "json_schema", and only with it')
        return self


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionName
